"""Compute budgets: one unit, one amount, and the fixed fractions of it at which every run is evaluated.

A budget is spent in one of five units, all read from the shared :class:`~harness.compute.Ledger`
(never from the method): policy forward-equivalents (forward + 2·backward), model FLOPs, wall
seconds of sampling + reward + training, sampled images, or iterations. A run stops at the first
iteration whose spent amount reaches the budget, and it is evaluated at the first iteration that
reaches each fraction in ``eval_at``, so every method is evaluated at the same compute points.
``eval_at`` is a list of fractions, or a geometric schedule ``{geometric: N, first: F}``: N fractions
spaced evenly in log from F to 1, dense early, where fast methods cross their targets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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


GEOMETRIC_KEYS = ("geometric", "first")
GEOMETRIC_FORM = "{geometric: N, first: F} with an integer N >= 2 and 0 < F < 1"


def geometric_fractions(n: int, first: float) -> tuple[float, ...]:
    """``n`` fractions evenly spaced in log from ``first`` to 1.0 (3 significant digits, the last exactly 1)."""
    return tuple(float(f"{first ** (1 - i / (n - 1)):.3g}") for i in range(n))


def eval_fractions(eval_at: tuple[float, ...] | Mapping[str, int | float]) -> tuple[float, ...]:
    """The fractions an ``eval_at`` value names (a list as given, or a geometric schedule expanded), 1.0 appended."""
    if isinstance(eval_at, Mapping):
        fractions = geometric_fractions(int(eval_at["geometric"]), float(eval_at["first"]))
    else:
        fractions = tuple(float(f) for f in eval_at)
    return fractions if fractions and fractions[-1] == 1.0 else (*fractions, 1.0)


def _check_geometric(eval_at: Mapping[str, int | float]) -> None:
    """A geometric schedule's keys and values, each wrong one named with the accepted form."""
    given = dict(eval_at)
    require(set(given) == set(GEOMETRIC_KEYS), "eval_at", given, GEOMETRIC_FORM)
    n, first = given["geometric"], given["first"]
    require(isinstance(n, int) and not isinstance(n, bool) and n >= 2, "eval_at", given, GEOMETRIC_FORM)
    require(math.isfinite(first) and 0 < first < 1, "eval_at", given, GEOMETRIC_FORM)
    fractions = geometric_fractions(int(n), float(first))
    require(len(set(fractions)) == len(fractions), "eval_at", given,
            f"{GEOMETRIC_FORM} whose fractions differ at 3 significant digits (fewer points or a smaller F)")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Budget:
    """``amount`` of ``unit`` per run, evaluated at the fractions ``eval_at`` of it (1.0 always included).

    ``eval_at``: increasing fractions in (0, 1], or ``{"geometric": N, "first": F}`` (see :func:`geometric_fractions`).
    """

    unit: Unit = "iterations"
    amount: float = 20
    eval_at: tuple[float, ...] | dict[str, int | float] = (0.25, 0.5, 0.75, 1.0)

    def __post_init__(self) -> None:
        require(self.unit in UNIT_COLUMNS, "unit", self.unit, f"one of {', '.join(UNIT_COLUMNS)}")
        require(math.isfinite(self.amount) and self.amount > 0, "amount", self.amount, "a finite number > 0")
        if isinstance(self.eval_at, Mapping):
            _check_geometric(self.eval_at)
            return
        fractions = list(self.eval_at)
        require(all(0 < f <= 1 for f in fractions) and fractions == sorted(set(fractions)), "eval_at", fractions,
                "increasing fractions in (0, 1]")  # fmt: skip

    @property
    def fractions(self) -> tuple[float, ...]:
        """The eval fractions, ending with 1.0 (the end of the run is always evaluated)."""
        return eval_fractions(self.eval_at)

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
