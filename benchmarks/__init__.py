"""Benchmark registry: one line per benchmark (``name → "module:factory"``), imported lazily."""

from harness.registry import Registry

BENCHMARKS: Registry = Registry("benchmark")
BENCHMARKS.add(
    "shapes", "benchmarks.shapes.benchmark:ShapesBenchmark", "embedded GenEval-style shapes world (32x32, CPU)"
)
