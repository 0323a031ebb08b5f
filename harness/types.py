"""The types every layer shares: a prompt, and the reward contract (spec, protocol, error, output check).

They live in the core so that methods, rewards and benchmarks can all use them without importing
each other: a method calls a reward it is given, a prompt set scores its eval images with one.

A reward scores a batch: ``images`` (B, 3, H, W) in [0, 1] and the matching prompts (text plus
metadata) → (B,) float32 scores on the CPU. A failed score raises :class:`RewardError`; it is
never silently replaced by 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Prompt:
    """A prompt's text plus the metadata its rewards need (GenEval clauses, OCR target, ...)."""

    text: str
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """The task the prompt belongs to ("" when the benchmark has no tasks)."""
        return str(self.metadata.get("tag", ""))


class RewardError(RuntimeError):
    """A reward could not score a batch (a NaN, a crash in the scorer, a dead server)."""


@dataclass(frozen=True)
class RewardSpec:
    """What a reward is: its name, version, range and direction.

    ``value_range`` may be unbounded (a standardised reward's is (−inf, inf)), but not NaN or reversed.
    """

    name: str
    version: str
    description: str
    higher_is_better: bool = True
    value_range: tuple[float, float] = (0.0, 1.0)
    differentiable: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.version, str):
            raise ValueError(f"version must be a string, got {self.version!r}")
        pair = isinstance(self.value_range, tuple | list) and len(self.value_range) == 2
        low, high = self.value_range if pair else (math.nan, math.nan)
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v) for v in (low, high))
        if not (numbers and low <= high):
            raise ValueError(
                f"value_range must be a (low, high) pair of numbers, not NaN, with low <= high; got {self.value_range!r}"
            )


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
