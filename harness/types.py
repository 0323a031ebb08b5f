"""The types every layer shares: a prompt, and the reward contract (spec, protocol, error, output check).

They live in the core so that methods, rewards and benchmarks can all use them without importing
each other: a method calls a reward it is given, a prompt set scores its eval images with one.

A reward scores a batch: ``images`` (B, 3, H, W) in [0, 1] and the matching prompts (text plus
metadata) → (B,) float32 scores on the CPU. A failed score raises :class:`RewardError`; it is
never silently replaced by 0. Every reward refuses a batch it cannot score (:func:`check_images`: not
(B, 3, H, W) floats, non-finite pixels, pixels outside [0, 1]) before scoring it, with a :class:`RewardError`.
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


def check_score_shape(name: str, scores: Tensor, batch: int) -> Tensor:
    """The float scores after checking their shape (B,), left where they are and not read back: for scores inside a
    training pass, where a non-finite score makes a non-finite loss, which the optimizer refuses."""
    if scores.shape != (batch,):
        raise RewardError(f"reward {name!r} returned shape {tuple(scores.shape)}, expected ({batch},)")
    return scores.float()


def check_scores(name: str, scores: Tensor, batch: int) -> Tensor:
    """Validate a reward's output: shape (B,), finite; raise :class:`RewardError` otherwise. Returns them on the
    host, as float32."""
    check_score_shape(name, scores, batch)
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        raise RewardError(f"reward {name!r} returned non-finite scores at batch positions {bad}")
    return scores.float().cpu()


IMAGE_TOLERANCE = 1e-3  # pixels may stray this far outside [0, 1] (rounding in a decoder) and still be scored


def check_images(name: str, images: Tensor, tolerance: float = IMAGE_TOLERANCE) -> None:
    """Refuse a batch reward ``name`` cannot score: raise :class:`RewardError` unless ``images`` is a float
    (B, 3, H, W) tensor of finite pixels in [0, 1] (± ``tolerance``). Every reward calls this first.

    A NaN image scored as 0.0 would be a silent reward; here it names the offending batch positions instead.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise RewardError(f"reward {name!r} expects images of shape (B, 3, H, W), got {shape}")
    if not images.is_floating_point():
        raise RewardError(f"reward {name!r} expects float images in [0, 1], got dtype {images.dtype}")
    if images.numel() == 0:
        return
    pixels = images.detach().flatten(1)
    finite = torch.isfinite(pixels).all(dim=1)
    inside = (pixels.amin(dim=1) >= -tolerance) & (pixels.amax(dim=1) <= 1 + tolerance)  # NaN compares False
    if bool((finite & inside).all()):  # one device sync
        return
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise RewardError(f"reward {name!r} got non-finite pixels (NaN or inf) in images at batch positions {bad}")
    bad = (~inside).nonzero().flatten().tolist()
    low, high = float(pixels.amin()), float(pixels.amax())
    raise RewardError(
        f"reward {name!r} expects pixels in [0, 1], got values in [{low:.4g}, {high:.4g}] in images at batch "
        f"positions {bad}"
    )
