"""``diffrl compare shapes``: DiffusionNFT vs FlowGRPO (with and without CFG) from the committed base
at one matched compute budget, written as a Markdown table.

DiffusionNFT runs a fixed number of iterations; its measured forward-equivalents become the
budget of every other run, which stops at the first iteration that reaches it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.shapes.benchmark import ShapesBenchmark
from benchmarks.shapes.checkpoint import load_shapes_policy
from harness.budget import Budget
from harness.optim import OptimConfig
from harness.plots import efficiency_curve, per_task_curves
from harness.trainer import LoopConfig, TrainResult, train, write_jsonl
from methods.diffusion_nft import DiffusionNFTConfig
from methods.flow_grpo import FlowGRPOConfig
from rewards.geneval import TASKS
from rewards.shapes import Judgement, ShapesGenEval


@dataclass(frozen=True)
class Variant:
    label: str
    method: str
    config: Any
    eval_cfg: float = 1.0  # guidance at evaluation, as the method's official protocol


DEFAULT_VARIANTS = (
    Variant("diffusion_nft", "diffusion_nft", DiffusionNFTConfig()),
    Variant("flow_grpo_cfg4.5", "flow_grpo", FlowGRPOConfig(), eval_cfg=4.5),  # official: 4.5 for all three
    Variant("flow_grpo_nocfg", "flow_grpo", FlowGRPOConfig(rollout_cfg=1.0, train_cfg=1.0)),
)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}


def compare(
    out: Path, iterations: int, lr: float, seed: int, judgement: Judgement = "correct",
    variants: tuple[Variant, ...] = DEFAULT_VARIANTS,
) -> Path:  # fmt: skip
    """Run every variant; the first one's spent compute is the budget of the others."""
    out.mkdir(parents=True, exist_ok=True)
    benchmark, reward = ShapesBenchmark(), ShapesGenEval(judgement=judgement)
    loop = LoopConfig(iterations=iterations, seed=seed, eval_every=5)
    results: dict[str, TrainResult] = {}
    seconds: dict[str, float] = {}
    budget = 0
    for variant in variants:
        run_loop = replace(loop, eval=replace(loop.eval, guidance_scale=variant.eval_cfg))
        if budget:
            run_loop = replace(
                run_loop, iterations=100 * iterations, budget=Budget(unit="fwd_equiv", amount=budget, eval_at=())
            )
        started = time.perf_counter()
        result = train(
            variant.method, variant.config, load_shapes_policy(), benchmark, reward, run_loop, OptimConfig(lr=lr)
        )
        seconds[variant.label] = time.perf_counter() - started
        results[variant.label] = result
        budget = budget or result.ledger.fwd_equiv
        write_jsonl(out / f"{variant.label}.jsonl", map(_jsonable, result.iterations + result.evaluations))
    _write_table(out, results, seconds, variants, iterations, lr, seed, judgement)
    tidy = pd.DataFrame([{"variant": label, **row} for label, result in results.items() for row in result.evaluations])
    tidy.to_csv(out / "results.csv", index=False)
    efficiency_curve(tidy, "eval/overall", "compute/fwd_equiv", out / "overall_vs_fwd_equiv")
    per_task_curves(tidy, [f"eval/{task}" for task in TASKS], "compute/fwd_equiv", out / "tasks_vs_fwd_equiv")
    return out / "table.md"


def _write_table(out: Path, results: dict[str, TrainResult], seconds: dict[str, float], variants: tuple[Variant, ...],
                 iterations: int, lr: float, seed: int, judgement: str) -> None:  # fmt: skip
    first = results[variants[0].label].evaluations[0]
    tasks = [k[5:] for k in first if k.startswith("eval/") and k[5:] != "overall"]  # tasks, strict, partial
    header = "| run | eval CFG | iterations | fwd_equiv | overall | " + " | ".join(tasks) + " | wall s |"
    lines = [header, "|" + "---|" * (6 + len(tasks))]
    base_rows: dict[float, dict[str, float]] = {}
    for variant in variants:  # the base as each eval protocol sees it (iteration 0 of that run)
        base_rows.setdefault(variant.eval_cfg, results[variant.label].evaluations[0])
    for scale, row in base_rows.items():
        cells = " | ".join(f"{row['eval/' + t]:.3f}" for t in tasks)
        lines.append(f"| base | {scale:g} | 0 | 0 | {row['eval/overall']:.3f} | {cells} | |")
    for variant in variants:
        final = results[variant.label].evaluations[-1]
        cells = " | ".join(f"{final['eval/' + t]:.3f}" for t in tasks)
        lines.append(
            f"| {variant.label} | {variant.eval_cfg:g} | {final['iteration']} | {final['compute/fwd_equiv']:,} | "
            f"{final['eval/overall']:.3f} | {cells} | {seconds[variant.label]:.0f} |"
        )
    configs = {v.label: {"method": v.method, **asdict(v.config)} for v in variants}
    (out / "configs.json").write_text(json.dumps(configs, indent=2) + "\n")
    footer = (
        f"\nEval: GenEval accuracy (official rule), 384 images, 10-step Euler ODE, EMA weights, CFG as in the method's "
        f"official protocol (column 'eval CFG'). "
        f"Train: reward shapes_geneval/{judgement}, 16 prompts x 8 images per iteration, AdamW lr {lr:g}, seed {seed}; "
        f"every run after the first stops at the first iteration that reaches the first run's fwd_equiv. "
        f"Made by `diffrl compare shapes --iterations {iterations} --lr {lr:g} --seed {seed} --judgement {judgement} --out {out}`.\n"
    )
    (out / "table.md").write_text("\n".join(lines) + "\n" + footer)
