"""The Benchmark protocol: a named prompt set with train/eval splits and its metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from torch import Tensor

from harness.types import Prompt


@runtime_checkable
class Benchmark(Protocol):
    """A prompt set: seeded training prompts, a fixed eval set, and the metric it reports."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def images_per_prompt(self) -> int:
        """Eval images per eval prompt."""
        ...

    @property
    def eval_seed(self) -> int:
        """Initial noise of eval image j of prompt i comes from (eval_seed, i, j)."""
        ...

    @property
    def metrics(self) -> tuple[str, ...]:
        """The keys `evaluate` returns, "overall" first."""
        ...

    def train_prompts(self, n: int, rng: np.random.Generator) -> list[Prompt]:
        """``n`` training prompts drawn with ``rng``."""
        ...

    def eval_prompts(self) -> list[Prompt]:
        """The fixed evaluation prompts."""
        ...

    def evaluate(self, images: Tensor, prompts: Sequence[Prompt]) -> dict[str, float]:
        """Score eval images (B, 3, H, W) in [0, 1]; returns ``overall`` and per-task numbers."""
        ...
