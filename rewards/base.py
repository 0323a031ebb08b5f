"""The weighted combination of rewards; the reward contract itself lives in :mod:`harness.types`.

A reward scores a batch: ``images`` (B, 3, H, W) in [0, 1] and the matching prompts (text plus
metadata) → (B,) float32 scores on the CPU. A failed score raises :class:`RewardError`; it is
never silently replaced by 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from harness.types import Prompt, Reward, RewardError, RewardSpec, check_images, check_scores

if TYPE_CHECKING:
    from rewards.normalize import Normalizer

__all__ = ["Reward", "RewardError", "RewardSpec", "WeightedReward", "check_images", "check_scores"]


class WeightedReward:
    """``Σ_k w_k · reward_k``: a weighted sum of raw scores, as FlowGRPO/DiffusionNFT's ``multi_score``.

    ``normalizers`` (optional, per reward key; see :mod:`rewards.normalize`) map a reward's raw scores
    to a common scale before weighting: ``Σ_k w_k · n_k(reward_k)``; keys without one stay raw.
    ``last_components`` always holds the raw scores, ``last_normalized`` the normalised ones.
    Weights are finite and ≥ 0 (a weight of 0 keeps a reward's scores in ``last_components`` without
    training on them).
    """

    def __init__(
        self,
        rewards: Mapping[str, Reward],
        weights: Mapping[str, float],
        normalizers: Mapping[str, Normalizer] | None = None,
    ) -> None:
        if set(rewards) != set(weights):
            raise ValueError(f"rewards {sorted(rewards)} and weights {sorted(weights)} must name the same rewards")
        for key, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
                raise ValueError(f"weight of reward {key!r} must be a finite number, got {weight!r}")
            if weight < 0:
                raise ValueError(f"weight of reward {key!r} must be >= 0, got {weight!r}")
        self.rewards, self.weights = dict(rewards), dict(weights)
        self.normalizers = dict(normalizers or {})
        if not set(self.normalizers) <= set(rewards):
            raise ValueError(f"normalizers {sorted(self.normalizers)} name rewards not in {sorted(rewards)}")
        # A weight of 0 contributes exactly 0, also for an unbounded (normalised) range, where 0·inf is NaN.
        ranges = [(self._range(k) if self.weights[k] else (0.0, 0.0), self.weights[k]) for k in self.rewards]
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
        check_images(self.spec.name, images)
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
