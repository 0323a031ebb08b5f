"""Budgets: the eval schedule as fractions or a geometric schedule, validated where it is built."""

from __future__ import annotations

import pytest

from harness.budget import Budget, eval_fractions, geometric_fractions
from harness.config import ConfigError, build
from harness.suite import validate_suite
from tests.harness.test_runner import TINY


def test_a_geometric_schedule_is_log_spaced_from_first_to_the_end():
    fractions = geometric_fractions(8, 0.02)
    assert fractions == (0.02, 0.035, 0.0612, 0.107, 0.187, 0.327, 0.572, 1.0)
    ratios = [b / a for a, b in zip(fractions, fractions[1:], strict=False)]
    assert max(ratios) / min(ratios) < 1.02  # evenly spaced in log (3 significant digits)
    assert Budget(eval_at={"geometric": 8, "first": 0.02}).fractions == fractions
    assert eval_fractions([0.5]) == (0.5, 1.0)  # the end of the run is always evaluated


@pytest.mark.parametrize(
    ("eval_at", "message"),
    [
        ({"geometric": 1, "first": 0.02}, "with an integer N >= 2 and 0 < F < 1"),
        ({"geometric": 8, "first": 1.5}, "with an integer N >= 2 and 0 < F < 1"),
        ({"geometric": 8, "frist": 0.02}, "eval_at must be {geometric: N, first: F}"),
        ({"geometric": 500, "first": 0.9}, "whose fractions differ at 3 significant digits"),
        ([0.5, 0.25], "eval_at must be increasing fractions in (0, 1], got [0.5, 0.25]"),
    ],
)
def test_a_bad_schedule_is_refused_with_the_key_and_the_accepted_forms(eval_at, message):
    with pytest.raises(ConfigError) as error:
        build(Budget, {"unit": "fwd_equiv", "amount": 100, "eval_at": eval_at}, where="suite.budget")
    assert str(error.value).startswith("suite.budget.eval_at = ") and message in str(error.value)


def test_a_suite_takes_a_geometric_schedule_and_resolves_it_as_written():
    suite = validate_suite({**TINY, "budget": {"unit": "iterations", "amount": 4, "eval_at": {"geometric": 3,
                                                                                                "first": 0.25}}})  # fmt: skip
    assert suite.config.budget.fractions == (0.25, 0.5, 1.0)
    assert suite.resolved()["budget"]["eval_at"] == {"geometric": 3, "first": 0.25}
