"""``diffrl bench methods``: seconds per iteration (sampling / reward / training) and peak memory.

Each method runs in a fresh process (so that peak RSS is its own) from the committed shapes
base, for ``warmup + iterations`` iterations of 16 prompts × 8 images without evaluation; the
warm-up iterations are excluded from the timings. This is a benchmark, not a test: it asserts
nothing about speed.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import resource
from pathlib import Path
from typing import Any

import torch

from harness.compare import DEFAULT_VARIANTS, Variant


def _measure(variant: Variant, iterations: int, warmup: int, threads: int, queue: Any) -> None:
    from benchmarks.shapes.benchmark import ShapesBenchmark
    from benchmarks.shapes.checkpoint import load_shapes_policy
    from harness.optim import OptimConfig
    from harness.trainer import LoopConfig, train
    from rewards.shapes import ShapesGenEval

    torch.set_num_threads(threads)
    loop = LoopConfig(iterations=warmup, evaluate=False)
    policy = load_shapes_policy()
    common = (ShapesBenchmark(), ShapesGenEval())
    warm = train(variant.method, variant.config, policy, *common, loop, OptimConfig(lr=1e-5), progress=False).ledger
    full = train(variant.method, variant.config, policy, *common, LoopConfig(iterations=warmup + iterations, evaluate=False),
                 OptimConfig(lr=1e-5), progress=False).ledger  # fmt: skip
    per_iteration = {p: (full.seconds[p] - warm.seconds[p]) / iterations for p in ("sampling", "reward", "training")}
    queue.put({
        "run": variant.label,
        **{f"{p}_s": round(v, 2) for p, v in per_iteration.items()},
        "total_s": round(sum(per_iteration.values()), 2),
        "fwd_equiv_per_iteration": (full.fwd_equiv - warm.fwd_equiv) // iterations,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    })  # fmt: skip


def bench_methods(out: Path, iterations: int = 2, warmup: int = 1, threads: int = 2) -> Path:
    """Measure every default variant; write ``bench_methods.md`` and ``.json`` into ``out``."""
    context = mp.get_context("spawn")
    rows = []
    for variant in DEFAULT_VARIANTS:
        queue = context.Queue()
        process = context.Process(target=_measure, args=(variant, iterations, warmup, threads, queue))
        process.start()
        rows.append(queue.get())
        process.join()
    device = f"{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_methods.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2) + "\n")
    lines = [
        "| run | sampling s | reward s | training s | total s/iter | fwd_equiv/iter | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['run']} | {r['sampling_s']} | {r['reward_s']} | {r['training_s']} | {r['total_s']} | "
        f"{r['fwd_equiv_per_iteration']:,} | {r['peak_rss_mb']} |"
        for r in rows
    ]
    footer = f"\nCPU ({device}); 16 prompts x 8 images per iteration, mean of {iterations} after {warmup} warm-up. Made by `diffrl bench methods --out {out}`.\n"
    (out / "bench_methods.md").write_text("\n".join(lines) + "\n" + footer)
    return out / "bench_methods.md"
