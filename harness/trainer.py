"""The one training loop every method shares.

collect (sampling) → decode and reward (sampling / reward) → method.update (training) → EMA and
soft updates inside the method's optimizer steps → evaluate the EMA weights on schedule.
Prompts, initial noise and eval noise come from :mod:`harness.seeding`, so two methods with the
same seed see the same training prompts and the same eval images' noise.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.base import Benchmark
from harness.compute import CountingPolicy, Ledger
from harness.evaluate import EvalSettings, evaluate_policy
from harness.optim import OptimConfig, Optimization
from harness.policy import Policy
from harness.samplers import make_sampler
from harness.seeding import generator, numpy_rng
from methods import METHODS
from rewards.base import Reward, check_scores

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Batch geometry, budget and eval schedule of one training run."""

    iterations: int = 20  # the cap on iterations
    budget_fwd_equiv: int = 0  # also stop once this many forward-equivalents are spent (0: no budget)
    prompts_per_iteration: int = 16
    images_per_prompt: int = 8  # group size
    seed: int = 0
    eval_every: int = 0  # iterations between evaluations (0: only before and after training)
    evaluate: bool = True  # False only for speed measurements
    eval_sampler: str = "euler"
    eval: EvalSettings = field(default_factory=EvalSettings)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line (training logs, evaluation rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@dataclass
class TrainResult:
    """Per-iteration training logs and one row per evaluation (with every compute counter)."""

    iterations: list[dict[str, float]]
    evaluations: list[dict[str, float]]
    ledger: Ledger


def build_method(name: str, method_cfg: Any, policy: Policy, optim_cfg: OptimConfig) -> tuple[Any, Optimization]:
    """Instantiate a registered method with its own optimizer state."""
    method_cls = METHODS.get(name)
    if not isinstance(method_cfg, method_cls.Config):
        raise TypeError(f"method {name!r} takes a {method_cls.Config.__name__}, got {type(method_cfg).__name__}")
    optim = Optimization(policy.trainable_parameters(), optim_cfg, ema_interval=method_cfg.ema_interval)
    return method_cls(method_cfg, policy, optim), optim


def train(
    method_name: str,
    method_cfg: Any,
    policy: Policy,
    benchmark: Benchmark,
    reward: Reward,
    loop: LoopConfig,
    optim_cfg: OptimConfig,
    *,
    progress: bool = True,
    on_eval: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``method_name`` on ``benchmark`` prompts with ``reward``; evaluate EMA weights on schedule."""
    torch.manual_seed(loop.seed)
    ledger = Ledger()
    counted = CountingPolicy(policy, ledger)
    method, optim = build_method(method_name, method_cfg, counted, optim_cfg)
    eval_sampler = make_sampler(loop.eval_sampler)
    prompt_rng = numpy_rng(loop.seed, "train-prompts")
    started = time.perf_counter()
    iterations: list[dict[str, float]] = []
    evaluations: list[dict[str, float]] = []

    def evaluate(iteration: int) -> None:
        if not loop.evaluate:
            return
        with ledger.phase("eval"), optim.ema.applied():
            output = evaluate_policy(counted, benchmark, eval_sampler, loop.eval, progress=False)
        row = {"seed": loop.seed, "iteration": iteration, "optimizer_steps": optim.global_step, **ledger.snapshot(),
               **{f"eval/{k}": v for k, v in output.scores.items()}}  # fmt: skip
        evaluations.append(row)
        log.info("eval @%d: overall %.3f", iteration, output.scores["overall"])
        if on_eval is not None:
            on_eval(row)

    evaluate(0)
    steps = range(1, loop.iterations + 1)
    # With a compute budget the iteration count is unknown: show a counter, not a bar to the cap.
    bar = tqdm(iter(steps) if loop.budget_fwd_equiv else steps, desc=method_name, unit="it", disable=not progress)
    for iteration in bar:
        prompts = benchmark.train_prompts(loop.prompts_per_iteration, prompt_rng)
        expanded = [p for p in prompts for _ in range(loop.images_per_prompt)]
        group_ids = torch.arange(len(prompts)).repeat_interleave(loop.images_per_prompt)
        with ledger.phase("sampling"):
            rollout = method.collect(expanded, group_ids, generator(loop.seed, "collect", iteration))
            images = counted.decode(rollout.x0)
        with ledger.phase("reward"):
            rewards = check_scores(reward.spec.name, reward(images, expanded), len(expanded))
        with ledger.phase("training"):
            logs = method.update(rollout, rewards, generator(loop.seed, "update", iteration))
        row = {"iteration": iteration, "train/reward_mean": rewards.mean().item(), "train/reward_std": rewards.std().item(),
               **logs, "compute/fwd_equiv": ledger.fwd_equiv, "time/elapsed": time.perf_counter() - started}  # fmt: skip
        iterations.append(row)
        bar.set_postfix(reward=f"{row['train/reward_mean']:.3f}")
        done = iteration == loop.iterations or 0 < loop.budget_fwd_equiv <= ledger.fwd_equiv
        if done or (loop.eval_every and iteration % loop.eval_every == 0):
            evaluate(iteration)
        if done:
            break
    return TrainResult(iterations, evaluations, ledger)
