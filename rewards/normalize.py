"""Per-reward normalisation for weighted combinations (an option of :class:`rewards.base.WeightedReward`).

FlowGRPO/DiffusionNFT's ``multi_score`` sums *raw* scores (PickScore/26 ≈ 0.85, HPSv2.1 ≈ 0.3, CLIP cos ≈ 0.3,
Aesthetic ≈ 5.5), so a reward's weight also carries its scale. These put scores on a common scale first:

* :class:`FixedRange`: ``(x − low) / (high − low)``, then clamped to [0, 1] unless ``clip=False``.
  Deterministic and stateless; ``low``/``high`` are the user's choice (e.g. typical ranges, not the
  theoretical bounds in ``RewardSpec.value_range``, which would squash everything into a sliver).
* :class:`RunningMeanStd`: ``(x − μ) / (σ + eps)`` where μ and σ (population std) are over *every score
  seen so far*, this batch included: the statistics are updated with the batch first (Chan et al.'s
  parallel Welford update), then applied. ``update=False`` freezes them (e.g. for evaluation).
  Statistics are detached, so gradients pass through as a fixed affine map.

Neither is used by the official code; both are opt-in and leave the raw scores in
``WeightedReward.last_components``.
"""

from __future__ import annotations

import math
from typing import Protocol

from torch import Tensor


class Normalizer(Protocol):
    """Maps a reward's (B,) scores to a common scale."""

    def __call__(self, scores: Tensor) -> Tensor: ...

    def describe(self) -> str:
        """A short tag for spec names, e.g. ``range(0.2,0.35)``."""
        ...

    def output_range(self, value_range: tuple[float, float]) -> tuple[float, float]:
        """The range of normalised scores given the raw range."""
        ...


class FixedRange:
    """``(x − low) / (high − low)``, clamped to [0, 1] when ``clip`` (the default)."""

    def __init__(self, low: float, high: float, clip: bool = True) -> None:
        for name, value in (("low", low), ("high", high)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"FixedRange {name} must be a finite number, got {value!r}")
        if not high > low:
            raise ValueError(f"FixedRange needs high > low, got low={low}, high={high}")
        self.low, self.high, self.clip = float(low), float(high), clip

    def __call__(self, scores: Tensor) -> Tensor:
        out = (scores - self.low) / (self.high - self.low)
        return out.clamp(0.0, 1.0) if self.clip else out

    def describe(self) -> str:
        return f"range({self.low:g},{self.high:g}{'' if self.clip else ',noclip'})"

    def output_range(self, value_range: tuple[float, float]) -> tuple[float, float]:
        if self.clip:
            return (0.0, 1.0)
        span = self.high - self.low
        return ((value_range[0] - self.low) / span, (value_range[1] - self.low) / span)


class RunningMeanStd:
    """``(x − μ) / (σ + eps)`` with μ, σ over all scores seen so far (batch included; ``update=False`` freezes)."""

    def __init__(self, eps: float = 1e-6, update: bool = True) -> None:
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"RunningMeanStd eps must be a finite number > 0, got {eps!r}")
        self.eps, self.update = eps, update
        self.count, self.mean, self.m2 = 0, 0.0, 0.0  # m2 = Σ (x − mean)²

    def observe(self, scores: Tensor) -> None:
        """Merge a batch into the running statistics (Chan et al. parallel variance)."""
        values = scores.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = ((values - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """Population standard deviation of the scores seen (0 before two scores)."""
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def __call__(self, scores: Tensor) -> Tensor:
        if self.update:
            self.observe(scores)
        if self.count == 0:
            raise ValueError("RunningMeanStd(update=False) has seen no scores; observe() some first")
        return (scores - self.mean) / (self.std + self.eps)

    def state_dict(self) -> dict[str, float]:
        """The running statistics (a resumed training run restores them)."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])

    def describe(self) -> str:
        return "standardized"

    def output_range(self, value_range: tuple[float, float]) -> tuple[float, float]:
        return (-math.inf, math.inf)
