"""The Reward protocol, its spec, and the weighted combination of rewards.

A reward scores a batch: ``images`` (B, 3, H, W) in [0, 1] and the matching prompts (text plus
metadata) → (B,) float32 scores on the CPU. A failed score raises :class:`RewardError`; it is
never silently replaced by 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from benchmarks.base import Prompt


class RewardError(RuntimeError):
    """A reward could not score a batch (a NaN, a crash in the scorer, a dead server)."""


@dataclass(frozen=True)
class RewardSpec:
    """What a reward is: its name, version, range and direction."""

    name: str
    version: str
    description: str
    higher_is_better: bool = True
    value_range: tuple[float, float] = (0.0, 1.0)
    differentiable: bool = False


@runtime_checkable
class Reward(Protocol):
    """Batched scorer: images (B, 3, H, W) in [0, 1], prompts → (B,) scores."""

    spec: RewardSpec

    def __call__(self, images: Tensor, prompts: Sequence[Prompt]) -> Tensor: ...


def check_scores(name: str, scores: Tensor, batch: int) -> Tensor:
    """Validate a reward's output: shape (B,), finite; raise :class:`RewardError` otherwise."""
    if scores.shape != (batch,):
        raise RewardError(f"reward {name!r} returned shape {tuple(scores.shape)}, expected ({batch},)")
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        raise RewardError(f"reward {name!r} returned non-finite scores at batch positions {bad}")
    return scores.float().cpu()


class WeightedReward:
    """``Σ_k w_k · reward_k``: a weighted sum of raw scores, as FlowGRPO/DiffusionNFT's ``multi_score``."""

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float]) -> None:
        if set(rewards) != set(weights):
            raise ValueError(f"rewards {sorted(rewards)} and weights {sorted(weights)} must name the same rewards")
        self.rewards, self.weights = dict(rewards), dict(weights)
        low = sum(min(w * r.spec.value_range[0], w * r.spec.value_range[1]) for r, w in self._pairs())
        high = sum(max(w * r.spec.value_range[0], w * r.spec.value_range[1]) for r, w in self._pairs())
        self.spec = RewardSpec(
            name="+".join(f"{w:g}*{k}" for k, w in self.weights.items()),
            version="+".join(r.spec.version for r in self.rewards.values()),
            description="weighted sum of " + ", ".join(self.rewards),
            value_range=(low, high),
            differentiable=all(r.spec.differentiable for r in self.rewards.values()),
        )
        self.last_components: dict[str, Tensor] = {}

    def _pairs(self) -> list[tuple[Reward, float]]:
        return [(self.rewards[k], self.weights[k]) for k in self.rewards]

    def __call__(self, images: Tensor, prompts: Sequence[Prompt]) -> Tensor:
        total = torch.zeros(images.shape[0])
        self.last_components = {}
        for key, reward in self.rewards.items():
            scores = check_scores(key, reward(images, prompts), images.shape[0])
            self.last_components[key] = scores
            total += self.weights[key] * scores
        return total
