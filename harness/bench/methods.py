"""``diffrl bench methods``: seconds per iteration (sampling / reward / training), one evaluation's seconds
and peak memory of each variant of a suite; ``diffrl bench overhead``: how a suite run's wall time splits
into methods, evaluation and harness.

Each variant runs in a fresh process (so that peak RSS is its own) from the suite's model, with its
benchmark, its training reward and its batch geometry, for ``warmup + iterations`` iterations without
evaluation; the phase times of the warm-up iterations are left out, and one evaluation of the untrained
model is timed apart. This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch


def _measure(suite_name: str, label: str, iterations: int, warmup: int, threads: int, queue: Any) -> None:
    """In a fresh process: one timed evaluation, then the variant's iterations; puts one row on ``queue``."""
    from harness.suite import load_suite

    torch.set_num_threads(threads)
    queue.put(measure_variant(load_suite(suite_name), label, iterations, warmup))


def measure_variant(
    suite: Any, label: str, iterations: int, warmup: int, *, evaluate: bool = True, policy: Any = None
) -> dict[str, Any]:
    """One variant of ``suite`` as its cells run it (its model, benchmark, training reward and geometry): the mean
    phase seconds of ``iterations`` after ``warmup`` untimed ones, and (``evaluate``) one evaluation's seconds.

    The model comes from the suite's own loader (``model.device`` included), so a GPU run takes this path too;
    ``policy``: one already loaded that way, trained instead of a fresh one.
    """
    from harness.evaluate import evaluate_policy
    from harness.runner import build_benchmark, build_reward, load_policy
    from harness.samplers import make_sampler
    from harness.trainer import LoopConfig, train
    from methods import METHODS

    entry, spec = next(m for m in suite.config.methods if m.label == label), suite.config.train
    benchmark, reward = build_benchmark(suite), build_reward(suite, label)  # the variant's own training reward
    loop = LoopConfig(iterations=warmup + iterations, evaluate=False, prompts_per_iteration=spec.prompts_per_iteration,
                      images_per_prompt=spec.images_per_prompt)  # fmt: skip
    eval_seconds = None
    if evaluate:
        started = time.perf_counter()
        evaluate_policy(load_policy(suite), benchmark, make_sampler(suite.config.eval.sampler),
                        suite.eval_settings(label), progress=False)  # fmt: skip
        eval_seconds = round(time.perf_counter() - started, 2)
    rows: list[dict[str, float]] = []
    policy = policy if policy is not None else load_policy(suite)
    ledger = train(METHODS.get(entry.method), suite.method_configs[label], policy, benchmark, reward, loop, spec.optim,
                   progress=False, label=label, on_iteration=rows.append).ledger  # fmt: skip
    timed = rows[warmup:]  # the warm-up iterations (first calls, FLOP counting) are not timed
    per_iteration = {
        p: sum(r[f"time/{p}_seconds"] for r in timed) / iterations for p in ("sampling", "reward", "training")
    }
    fwd_before = rows[warmup - 1]["compute/fwd_equiv"] if warmup else 0
    return {
        "run": label,
        **{f"{p}_s": round(v, 2) for p, v in per_iteration.items()},
        "total_s": round(sum(per_iteration.values()), 2),
        "fwd_equiv_per_iteration": int(ledger.fwd_equiv - fwd_before) // iterations,
        "eval_s": eval_seconds,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def estimate_suite_seconds(rows: list[dict[str, Any]], suite_name: str) -> tuple[float, dict[str, float]]:
    """A suite's wall time from measured per-iteration and per-evaluation costs (no harness overhead).

    Per cell: iterations to reach the budget × seconds per iteration + one evaluation per eval point;
    the untrained model is evaluated once per eval protocol.
    """
    from harness.suite import load_suite

    suite = load_suite(suite_name)
    budget = suite.config.budget
    if budget.unit != "fwd_equiv":
        raise ValueError(f"estimates need a fwd_equiv budget; {suite_name} uses {budget.unit}")
    per_cell = {}
    for row in rows:
        iterations = math.ceil(budget.amount / row["fwd_equiv_per_iteration"])
        per_cell[row["run"]] = iterations * row["total_s"] + len(budget.fractions) * row["eval_s"]
    protocols = {m.eval_cfg: next(r["eval_s"] for r in rows if r["run"] == m.label) for m in suite.config.methods}
    return len(suite.config.seeds) * sum(per_cell.values()) + sum(protocols.values()), per_cell


def bench_methods(
    out: Path, iterations: int = 2, warmup: int = 1, threads: int = 2, suite_name: str = "shapes_quick"
) -> Path:
    """Measure every variant of a suite; write a Markdown table (with the suite's estimated run time) and JSON."""
    from harness.suite import load_suite

    if iterations < 1 or warmup < 0:
        raise ValueError(f"bench methods needs iterations >= 1 and warmup >= 0, got {iterations} and {warmup}")
    suite = load_suite(suite_name)
    context = mp.get_context("spawn")
    rows = []
    for entry in suite.config.methods:
        queue = context.Queue()
        process = context.Process(target=_measure, args=(suite_name, entry.label, iterations, warmup, threads, queue))
        process.start()
        rows.append(queue.get())
        process.join()
    device = f"{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}"
    out.mkdir(parents=True, exist_ok=True)
    name = f"bench_{suite.name}"
    (out / f"{name}.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2) + "\n")
    lines = [
        "| run | sampling s | reward s | training s | total s/iter | fwd_equiv/iter | eval s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['run']} | {r['sampling_s']} | {r['reward_s']} | {r['training_s']} | {r['total_s']} | "
        f"{r['fwd_equiv_per_iteration']:,} | {r['eval_s']} | {r['peak_rss_mb']} |"
        for r in rows
    ]
    command = f"diffrl bench methods --suite {suite_name} --iterations {iterations} --warmup {warmup} " \
              f"--threads {threads} --out {out}"  # fmt: skip
    footer = f"\nCPU ({device}); the suite's batch geometry, mean of {iterations} after {warmup} warm-up. Made by `{command}`.\n"
    if suite.config.budget.unit == "fwd_equiv":
        total, _ = estimate_suite_seconds(rows, suite_name)
        footer += (
            f"\nEstimated wall time of `diffrl run {suite_name}` from these costs (iterations to the budget x "
            f"s/iteration + one evaluation per eval point, harness overhead excluded): {total / 60:.0f} min.\n"
        )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n" + footer)
    return out / f"{name}.md"


def overhead_table(timing: dict[str, Any], suite: str, command: str) -> str:
    """Markdown: where a suite run's wall time went (from its ``timing.json``)."""
    wall = timing["wall_seconds"]
    parts = {**{f"method {k}": v for k, v in timing["method_seconds"].items()},
             "evaluation": timing["eval_seconds"], "harness overhead": timing["harness_seconds"]}  # fmt: skip
    lines = ["| part | seconds | share of wall time |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.1f} | {seconds / wall:.1%} |" for name, seconds in parts.items()]
    lines.append(f"| **wall** | {wall:.1f} | 100% |")
    footer = (
        f"\nSuite {suite}, {timing['torch_threads']} torch threads. Harness overhead is everything but the methods' "
        f"sampling, reward and training and the evaluations (suite set-up, prompts, checkpoints, result files, "
        f"sample grids, trackers, tables and plots). Made by `{command}`.\n"
    )
    return "\n".join(lines) + "\n" + footer


def bench_overhead(suite_name: str, out: Path, threads: int = 2) -> Path:
    """Run ``suite_name`` from scratch in a temporary folder; write its wall-time breakdown to ``out``."""
    import tempfile

    from harness.report import write_report
    from harness.runner import run_suite
    from harness.suite import load_suite

    torch.set_num_threads(threads)
    suite = load_suite(suite_name)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        outcome = run_suite(suite, Path(folder), progress=False)
        write_report(Path(folder))  # part of what `diffrl run` does
        total = time.perf_counter() - started
        timing = json.loads((Path(folder) / "timing.json").read_text())
    if outcome.failed:
        raise RuntimeError(f"{len(outcome.failed)} cells failed; the overhead of a failed run is not meaningful")
    report_seconds = total - timing["wall_seconds"]
    timing["harness_seconds"] += report_seconds
    timing["wall_seconds"] = total
    timing["harness_fraction"] = timing["harness_seconds"] / total
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"overhead_{suite.name}.md"
    command = f"diffrl bench overhead --suite {suite_name} --threads {threads} --out {out}"
    path.write_text(overhead_table(timing, suite.name, command))
    (out / f"overhead_{suite.name}.json").write_text(json.dumps(timing, indent=2) + "\n")
    return path
