"""Benchmark registry: one line per benchmark (``name → "module:factory"``), imported lazily."""

from harness.registry import Registry

BENCHMARKS: Registry = Registry("benchmark")
BENCHMARKS.add(
    "shapes", "benchmarks.shapes.benchmark:ShapesBenchmark", "embedded GenEval-style shapes world (32x32, CPU)"
)
BENCHMARKS.add(
    "geneval",
    "benchmarks.prompt_sets.sets:GenEvalPromptSet",
    "official GenEval 553 prompts x4; generated train prompts",
)
BENCHMARKS.add(
    "ocr", "benchmarks.prompt_sets.sets:ocr", "FlowGRPO OCR prompts: 1018 test, train by URL; scored by the ocr reward"
)
BENCHMARKS.add(
    "drawbench", "benchmarks.prompt_sets.sets:drawbench", "DrawBench: 200 unique prompts x5 images, eval only"
)
BENCHMARKS.add(
    "pickapic", "benchmarks.prompt_sets.sets:pickapic", "FlowGRPO Pick-a-Pic prompts: 25432 train, 2048 test"
)
