"""Helpers shared by the forward-process baselines' tests: prompts, a counted method, a loop smoke run."""

from __future__ import annotations

import math
from typing import Any

import torch

from benchmarks.shapes.benchmark import ShapesBenchmark
from harness.compute import CountingPolicy, Ledger
from harness.optim import OptimConfig, Optimization
from harness.shapes_world.world import make_metadata
from harness.trainer import LoopConfig, train
from harness.types import Prompt, RewardSpec
from methods import METHODS
from rewards.shapes import ShapesGenEval


class Redness:
    """A differentiable test reward: mean red minus mean green and blue, per image (prompt-blind)."""

    spec = RewardSpec(name="redness", version="test", description="red − (green + blue)/2", value_range=(-1.0, 1.0),
                      differentiable=True)  # fmt: skip

    def __call__(self, images: torch.Tensor, prompts: object) -> torch.Tensor:
        channels = images.mean(dim=(2, 3))
        return channels[:, 0] - (channels[:, 1] + channels[:, 2]) / 2


def group_prompts(n_groups: int, group_size: int) -> tuple[list[Prompt], torch.Tensor]:
    """``n_groups`` single-object prompts, each repeated ``group_size`` times, and their group ids."""
    md = [make_metadata("single_object", (s,)) for s in ("circle", "square", "triangle", "diamond")][:n_groups]
    expanded = [Prompt(m["prompt"], m) for m in md for _ in range(group_size)]
    return expanded, torch.arange(n_groups).repeat_interleave(group_size)


def counted(method_cls: Any, cfg: Any, tiny_policy: Any, lr: float = 1e-3, reward: Any = None) -> tuple[Any, Ledger]:
    """The method on a counting wrapper of ``tiny_policy``, with its own optimizer (and ``reward`` if it takes one)."""
    ledger = Ledger()
    policy = CountingPolicy(tiny_policy, ledger)
    optim = Optimization(policy.trainable_parameters(), OptimConfig(lr=lr), ema_interval=cfg.ema_interval)
    return method_cls(cfg, policy, optim, *([reward] if reward is not None else [])), ledger


def loop_smoke(name: str, cfg: Any, tiny_policy: Any) -> list[dict[str, float]]:
    """Two iterations through ``harness.trainer.train``; asserts θ moved, "ref" did not, and logs are finite."""
    before = {k: v.clone() for k, v in tiny_policy.weight_state("train").items()}
    ref_before = tiny_policy.weight_state("ref")
    loop = LoopConfig(iterations=2, prompts_per_iteration=2, images_per_prompt=3, evaluate=False)
    bench = ShapesBenchmark(prompts_per_task=1, images_per_prompt=1)
    result = train(
        METHODS.get(name), cfg, tiny_policy, bench, ShapesGenEval(), loop, OptimConfig(lr=1e-3), progress=False
    )
    after, ref_after = tiny_policy.weight_state("train"), tiny_policy.weight_state("ref")
    assert any(not torch.equal(before[k], after[k]) for k in before), f"{name}: θ did not change"
    assert all(torch.equal(ref_before[k], ref_after[k]) for k in ref_before), f"{name}: the reference changed"
    assert len(result.iterations) == 2
    for row in result.iterations:
        train_keys = [k for k in row if k.startswith("train/")]
        # An iteration without signal (all groups tied, GRPO-style methods) may skip its step, and says so.
        assert "train/grad_norm" in train_keys or row.get("train/skipped") == 1.0, f"{name}: no step logged"
        assert all(math.isfinite(row[k]) for k in train_keys), f"{name}: non-finite metric in {row}"
    assert any("train/grad_norm" in row for row in result.iterations), f"{name}: never stepped"
    return result.iterations
