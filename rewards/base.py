"""The Reward protocol, its spec, and the weighted combination of rewards.

A reward scores a batch: ``images`` (B, 3, H, W) in [0, 1] and the matching prompts (text plus
metadata) → (B,) float32 scores on the CPU. A failed score raises :class:`RewardError`; it is
never silently replaced by 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

from benchmarks.base import Prompt

if TYPE_CHECKING:
    from rewards.normalize import Normalizer


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
    """``Σ_k w_k · reward_k``: a weighted sum of raw scores, as FlowGRPO/DiffusionNFT's ``multi_score``.

    ``normalizers`` (optional, per reward key; see :mod:`rewards.normalize`) map a reward's raw scores
    to a common scale before weighting: ``Σ_k w_k · n_k(reward_k)``; keys without one stay raw.
    ``last_components`` always holds the raw scores, ``last_normalized`` the normalised ones.
    """

    def __init__(
        self,
        rewards: Mapping[str, Reward],
        weights: Mapping[str, float],
        normalizers: Mapping[str, Normalizer] | None = None,
    ) -> None:
        if set(rewards) != set(weights):
            raise ValueError(f"rewards {sorted(rewards)} and weights {sorted(weights)} must name the same rewards")
        self.rewards, self.weights = dict(rewards), dict(weights)
        self.normalizers = dict(normalizers or {})
        if not set(self.normalizers) <= set(rewards):
            raise ValueError(f"normalizers {sorted(self.normalizers)} name rewards not in {sorted(rewards)}")
        ranges = [(self._range(k), self.weights[k]) for k in self.rewards]
        low = sum(min(w * r[0], w * r[1]) for r, w in ranges)
        high = sum(max(w * r[0], w * r[1]) for r, w in ranges)
        self.spec = RewardSpec(
            name="+".join(f"{w:g}*{k}{self._tag(k)}" for k, w in self.weights.items()),
            version="+".join(r.spec.version for r in self.rewards.values()),
            description="weighted sum of " + ", ".join(f"{k}{self._tag(k)}" for k in self.rewards),
            value_range=(low, high),
            differentiable=all(r.spec.differentiable for r in self.rewards.values()),
        )
        self.last_components: dict[str, Tensor] = {}
        self.last_normalized: dict[str, Tensor] = {}

    def _range(self, key: str) -> tuple[float, float]:
        raw = self.rewards[key].spec.value_range
        return self.normalizers[key].output_range(raw) if key in self.normalizers else raw

    def _tag(self, key: str) -> str:
        return f"[{self.normalizers[key].describe()}]" if key in self.normalizers else ""

    def state_dict(self) -> dict[str, object]:
        """State of the stateful normalizers (running statistics), for checkpoints."""
        return {k: n.state_dict() for k, n in self.normalizers.items() if hasattr(n, "state_dict")}

    def load_state_dict(self, state: dict[str, object]) -> None:
        for key, value in state.items():
            self.normalizers[key].load_state_dict(value)  # type: ignore[attr-defined]

    def __call__(self, images: Tensor, prompts: Sequence[Prompt]) -> Tensor:
        total = torch.zeros(images.shape[0])
        self.last_components, self.last_normalized = {}, {}
        for key, reward in self.rewards.items():
            scores = check_scores(key, reward(images, prompts), images.shape[0])
            self.last_components[key] = scores
            if key in self.normalizers:
                scores = check_scores(f"{key} (normalized)", self.normalizers[key](scores), images.shape[0])
            self.last_normalized[key] = scores
            total = total + self.weights[key] * scores
        return total
