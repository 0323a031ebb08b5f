"""Compute budgets: one unit, one amount, and the fixed fractions of it at which every run is evaluated.

A budget is spent in one of five units, all read from the shared :class:`~harness.compute.Ledger`
(never from the method): policy forward-equivalents (forward + 2·backward), model FLOPs, wall
seconds of sampling + reward + training, sampled images, or iterations. A run stops at the first
iteration whose spent amount reaches the budget, and it is evaluated at the first iteration that
reaches each fraction in ``eval_at``, so every method is evaluated at the same compute points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from harness.compute import Ledger
from harness.validation import require

Unit = Literal["fwd_equiv", "flops", "wall_seconds", "images", "iterations"]
# The result-table column that records each unit (every evaluation row records all of them).
UNIT_COLUMNS: dict[str, str] = {
    "fwd_equiv": "compute/fwd_equiv",
    "flops": "compute/flops",
    "wall_seconds": "compute/wall_seconds",
    "images": "compute/images_sampled",
    "iterations": "iteration",
}


@dataclass(frozen=True, kw_only=True)
class Budget:
    """``amount`` of ``unit`` per run, evaluated at the fractions ``eval_at`` of it (1.0 always included)."""

    unit: Unit = "iterations"
    amount: float = 20
    eval_at: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)

    def __post_init__(self) -> None:
        require(self.unit in UNIT_COLUMNS, "unit", self.unit, f"one of {', '.join(UNIT_COLUMNS)}")
        require(math.isfinite(self.amount) and self.amount > 0, "amount", self.amount, "a finite number > 0")
        fractions = list(self.eval_at)
        require(all(0 < f <= 1 for f in fractions) and fractions == sorted(set(fractions)), "eval_at", fractions,
                "increasing fractions in (0, 1]")  # fmt: skip

    @property
    def fractions(self) -> tuple[float, ...]:
        """The eval fractions, ending with 1.0 (the end of the run is always evaluated)."""
        return self.eval_at if self.eval_at and self.eval_at[-1] == 1.0 else (*self.eval_at, 1.0)

    def spent(self, ledger: Ledger, iteration: int) -> float:
        """How much of the budget's unit a run has spent after ``iteration`` iterations."""
        if self.unit == "iterations":
            return float(iteration)
        if self.unit == "fwd_equiv":
            return float(ledger.fwd_equiv)
        if self.unit == "images":
            return float(ledger.images["sampling"])
        if self.unit == "wall_seconds":
            return float(ledger.snapshot()["compute/wall_seconds"])
        if ledger.flops is None:
            raise RuntimeError("budget.unit 'flops' needs the model's FLOPs, which are measured on its first call")
        return float(ledger.flops)

    def done(self, ledger: Ledger, iteration: int) -> bool:
        return self.spent(ledger, iteration) >= self.amount
