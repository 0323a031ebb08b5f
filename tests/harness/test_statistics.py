"""harness.statistics on synthetic data with known answers, and the intervals' coverage on simulated experiments."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from harness.statistics import (
    Curves,
    Interval,
    Target,
    binomial_standard_error,
    crossings,
    difference_interval,
    eval_standard_error,
    expanded_alpha,
    improvement_interval,
    iqm,
    iqm_interval,
    mean_interval,
    paired_difference,
    probability_of_improvement,
    prompt_metric,
    speedup,
    to_target,
)

NAN = math.nan


def curves(*rows: list[float], x: list[float] | None = None) -> Curves:
    """Seeds evaluated at x = 0, 100, 200, … (NaN pads where a row is shorter)."""
    width = max(len(r) for r in rows)
    y = np.array([[*r, *[NAN] * (width - len(r))] for r in rows])
    xs = np.array([[*(x or [100.0 * i for i in range(len(r))]), *[NAN] * (width - len(r))] for r in rows])
    return Curves(xs, y)


def test_crossings_interpolate_between_eval_points_and_never_extrapolate():
    c = curves([0.1, 0.3, 0.5, 0.7], [0.1, 0.2, 0.25, 0.28], [0.6, 0.7, 0.8])
    # Seed 0 crosses 0.4 halfway between 100 (0.3) and 200 (0.5); seed 1 never (0.28 at its end, no
    # extrapolation); seed 2 starts above it: its first evaluation.
    np.testing.assert_allclose(crossings(c.x, c.y, 0.4), [150.0, NAN, 0.0])
    np.testing.assert_allclose(crossings(c.x, c.y, 0.5), [200.0, NAN, 0.0])  # reached exactly at a point
    # Several targets at once: (seeds, targets).
    np.testing.assert_allclose(crossings(c.x, c.y, np.array([0.2, 0.7])), [[50.0, 300.0], [100.0, NAN], [0.0, 100.0]])
    # The first crossing counts, even when the curve dips below the target afterwards.
    dip = curves([0.0, 0.6, 0.2, 0.8])
    assert crossings(dip.x, dip.y, 0.3)[0] == pytest.approx(50.0)
    np.testing.assert_array_equal(c.last_x, [300.0, 300.0, 200.0])
    np.testing.assert_array_equal(c.final, [0.7, 0.28, 0.8])


def test_curves_refuse_unordered_compute():
    with pytest.raises(ValueError, match="x must be increasing along each seed"):
        Curves(np.array([[0.0, 200.0, 100.0]]), np.zeros((1, 3)))


def test_targets_absolute_final_and_gain():
    ref = curves([0.2, 0.4, 0.6], [0.2, 0.3, 0.4])  # base 0.2, final seed mean 0.5
    base, final = ref.base.mean(), ref.final.mean()
    assert float(Target("absolute", 0.33).resolve(base, final)) == pytest.approx(0.33)
    assert float(Target("reference_final", 1.0).resolve(base, final)) == pytest.approx(0.5)
    assert float(Target("reference_gain", 0.8).resolve(base, final)) == pytest.approx(0.2 + 0.8 * 0.3)
    assert Target().kind == "reference_gain" and Target().value == 0.8  # the reports' default
    assert "80% of flow_grpo's final seed-mean gain" in Target().describe("flow_grpo")
    with pytest.raises(ValueError, match=r"value must be a fraction of the reference's gain in \(0, 1\], got 1.5"):
        Target("reference_gain", 1.5)
    with pytest.raises(ValueError, match="kind must be one of"):
        Target("median", 0.5)  # type: ignore[arg-type]


def test_to_target_is_a_lower_bound_when_some_seeds_never_reach_it():
    c = curves([0.1, 0.3, 0.5, 0.7], [0.1, 0.2, 0.25, 0.28])
    t = to_target(c, 0.4)
    assert (t.reached, t.seeds, t.complete) == (1, 2, False)
    assert t.mean == pytest.approx((150 + 300) / 2)  # the unreached seed counts at its last evaluation


def fast_and_slow(seeds: int) -> tuple[Curves, Curves]:
    """The slow reference crosses 0.5 at 400 ± 50 per seed, the fast variant at 100 ± 25."""
    x = np.linspace(0, 1000, 11)
    slow = [np.clip((x / (400 + 50 * k)) * 0.5, 0, 1) for k in np.linspace(-1, 1, seeds)]
    fast = [np.clip((x / (100 + 25 * k)) * 0.5, 0, 1) for k in np.linspace(-1, 1, seeds)]
    return Curves(np.tile(x, (seeds, 1)), np.array(slow)), Curves(np.tile(x, (seeds, 1)), np.array(fast))


def test_speedup_is_the_ratio_of_seed_means_with_a_two_sided_interval():
    slow, fast = fast_and_slow(5)
    s = speedup(slow, fast, Target("absolute", 0.5), resamples=2000)
    assert s.bound == "=" and s.value == pytest.approx(4.0)  # 400 / 100
    assert s.interval is not None and s.interval.unreached == 0
    assert 2.5 < s.interval.low < 4.0 < s.interval.high < 6.5
    same = speedup(slow, fast, Target("absolute", 0.5), resamples=2000)
    assert same == s  # seeded: the same table always prints the same interval


def test_below_three_seeds_there_is_no_interval_and_the_reason_says_why():
    slow, fast = fast_and_slow(2)
    s = speedup(slow, fast, Target("absolute", 0.5))
    assert s.value == pytest.approx(4.0) and s.interval is None and s.note == "no interval: 2 seeds (< 3)"
    assert mean_interval(np.array([0.1, 0.2])) is None
    assert difference_interval(np.array([0.1, 0.2, 0.3]), np.array([0.1, 0.2])) is None


def test_an_unreached_reference_gives_a_one_sided_bound_never_an_infinite_end():
    slow, fast = fast_and_slow(5)
    stuck = Curves(slow.x, slow.y.copy())
    stuck.y[0] = np.minimum(stuck.y[0], 0.45)  # one reference seed never reaches 0.5
    s = speedup(stuck, fast, Target("absolute", 0.5), resamples=2000)
    assert s.bound == ">=" and s.value == pytest.approx(
        np.mean([1000, *[400 + 50 * k for k in (-0.5, 0, 0.5, 1)]]) / 100
    )
    assert s.interval is not None and s.interval.high == math.inf and s.interval.low > 1
    # A resample misses seed 0 with probability (4/5)^5 = 0.33: the other 67% are unreached.
    assert s.interval.unreached == pytest.approx(1 - 0.8**5, abs=0.03)
    # The mirror image: the variant has the unreached seed, so the speedup is at most a value.
    mirror = speedup(fast, stuck, Target("absolute", 0.5), resamples=2000)
    assert mirror.bound == "<=" and mirror.interval is not None and mirror.interval.low == 0
    assert math.isfinite(mirror.interval.high)


def test_no_ratio_when_both_sides_miss_or_the_untrained_model_reaches_it():
    slow, _ = fast_and_slow(3)
    stuck = Curves(slow.x, np.minimum(slow.y, 0.45))
    assert speedup(stuck, stuck, Target("absolute", 0.5)).note == "not reached"
    half = Curves(slow.x, np.vstack([np.minimum(slow.y[0], 0.45), slow.y[1:]]))
    assert speedup(half, half, Target("absolute", 0.5)).note == "no bound: some seeds of both never reached it"
    early = Curves(slow.x, slow.y + 1.0)
    assert speedup(slow, early, Target("absolute", 0.5)).note == "reached by the untrained model"


def test_a_reference_target_is_recomputed_in_each_resample():
    x = np.linspace(0, 1000, 11)
    ref = Curves(np.tile(x, (4, 1)), np.array([f * x / 1000 for f in (0.4, 0.5, 0.6, 0.7)]))
    _, fast = fast_and_slow(4)
    final = speedup(ref, fast, Target("reference_final", 1.0), resamples=2000)
    # Its own final seed mean (0.55): two of the four reference seeds never reach it.
    assert final.bound == ">=" and final.interval is not None and final.interval.high == math.inf
    fixed = speedup(ref, fast, Target("absolute", 0.55), resamples=2000)
    assert fixed.interval is not None and fixed.interval.unreached == pytest.approx(1 - 0.5**4, abs=0.02)
    # Recomputed per resample, the target is each resample's own final mean, which nearly every resample has a
    # seed below; half of the reference's gain (0.275) is reached by every seed, at a target that varies.
    assert final.interval.unreached > fixed.interval.unreached
    gain, at_point = Target("reference_gain", 0.5), Target("absolute", 0.275)
    varying, still = speedup(ref, fast, gain, resamples=2000), speedup(ref, fast, at_point, resamples=2000)
    assert varying.value == pytest.approx(still.value) and varying.interval != still.interval


def test_expanded_percentile_level():
    # Hesterberg: z_{α'/2} = √(n/(n−1))·t_{α/2,n−1}; with many seeds it tends to the nominal 5%.
    assert expanded_alpha(5) == pytest.approx(2 * stats.norm.sf(math.sqrt(5 / 4) * stats.t.isf(0.025, 4)))
    assert expanded_alpha(5) < 0.01 < expanded_alpha(30) < 0.05


X = np.concatenate([[0.0], 0.02 ** (1 - np.arange(8) / 7)]) * 100_000  # an untrained eval and 8 log-spaced points


def simulated(rng: np.random.Generator, seeds: int, scale: float) -> Curves:
    """Known curves: 0.25 + 0.3·(1 − exp(−x/τ)), τ log-normal over seeds, eval noise on every point."""
    tau = scale * np.exp(rng.normal(0, 0.3, seeds))
    y = 0.25 + 0.3 * (1 - np.exp(-X[None] / tau[:, None])) + rng.normal(0, 0.015, (seeds, len(X)))
    y[:, 0] = 0.25  # the untrained model: one shared evaluation
    return Curves(np.tile(X, (seeds, 1)), y)


@pytest.mark.parametrize("target", [Target("absolute", 0.43), Target("reference_gain", 0.8)])
def test_speedup_intervals_cover_the_true_speedup_of_simulated_5_seed_experiments(target):
    rng = np.random.default_rng(0)
    population_ref, population_var = simulated(rng, 100_000, 30_000), simulated(rng, 100_000, 4_000)
    tau = float(target.resolve(0.25, population_ref.final.mean()))
    truth = np.nanmean(crossings(population_ref.x, population_ref.y, tau)) / np.nanmean(
        crossings(population_var.x, population_var.y, tau)
    )
    covered, experiments = 0, 200
    for e in range(experiments):
        s = speedup(simulated(rng, 5, 30_000), simulated(rng, 5, 4_000), target, resamples=2000, seed=e)
        assert s.interval is not None
        covered += s.interval.low <= truth <= s.interval.high
    assert covered / experiments >= 0.90  # nominal 95%


def test_mean_interval_covers_the_mean_with_5_seeds():
    rng = np.random.default_rng(1)
    covered = sum(
        (i := mean_interval(rng.normal(0.4, 0.05, 5), resamples=2000, seed=e)) is not None and i.low <= 0.4 <= i.high
        for e in range(300)
    )
    assert covered / 300 >= 0.90


def test_iqm_and_probability_of_improvement_match_their_definitions():
    scores = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]])
    assert float(iqm(scores)) == pytest.approx(stats.trim_mean(scores.ravel(), 0.25))  # mean of 0.3 … 0.6
    assert float(iqm(scores)) == pytest.approx(0.45)
    better, worse = np.array([[1.0, 0.5], [1.0, 0.5]]), np.array([[0.0, 0.5], [0.0, 0.5]])
    # Task 0: always better (1); task 1: always tied (½); averaged over tasks: ¾.
    assert float(probability_of_improvement(better, worse)) == pytest.approx(0.75)
    assert float(probability_of_improvement(worse, better)) == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    interval = improvement_interval(rng.normal(0.6, 0.05, (5, 6)), rng.normal(0.4, 0.05, (5, 6)), resamples=500)
    assert interval is not None and 0.8 < interval.low <= interval.high <= 1.0
    iqm_ci = iqm_interval(rng.normal(0.5, 0.05, (5, 6)), resamples=500)
    assert isinstance(iqm_ci, Interval) and iqm_ci.low < 0.5 < iqm_ci.high


def test_prompt_metric_is_the_unweighted_mean_of_task_means():
    tags = ["a", "a", "b", "b", "b", "b"]
    values = np.array([1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    assert float(prompt_metric(values, tags)) == pytest.approx((0.5 + 0.75) / 2)
    per_task = np.array([NAN, NAN, 1.0, 1.0, 1.0, 0.0])  # a per-task metric: the other task's prompts unscored
    assert float(prompt_metric(per_task, tags)) == pytest.approx(0.75)


def test_eval_standard_error_matches_the_stratified_analytic_error():
    rng = np.random.default_rng(0)
    tags = [t for t in "abcdef" for _ in range(16)]
    values = rng.binomial(4, 0.4, len(tags)) / 4  # 4 images per prompt
    se = eval_standard_error(values, tags, resamples=20_000)
    groups = [values[np.array(tags) == t] for t in "abcdef"]
    # The bootstrap's variance is the plug-in (ddof 0) one: Σ_t var_t / n_t / T².
    analytic = math.sqrt(sum(g.var() / len(g) for g in groups)) / 6
    assert se == pytest.approx(analytic, rel=0.05)
    with pytest.raises(ValueError, match="values must be"):
        eval_standard_error(values[:5], tags)


def test_paired_differences_cancel_the_prompts_shared_difficulty():
    rng = np.random.default_rng(0)
    tags = [t for t in "abc" for _ in range(32)]
    difficulty = rng.uniform(0, 1, len(tags))  # shared by every variant: same prompts, same noise
    ours = np.clip(difficulty + 0.1 + rng.normal(0, 0.02, (3, len(tags))), 0, 1.1)
    theirs = np.clip(difficulty + rng.normal(0, 0.02, (3, len(tags))), 0, 1.1)
    difference, se = paired_difference(ours, theirs, tags)
    assert difference == pytest.approx(0.1, abs=0.01)
    unpaired = math.hypot(eval_standard_error(ours.mean(0), tags), eval_standard_error(theirs.mean(0), tags))
    assert se < unpaired / 5


def test_binomial_standard_error():
    assert binomial_standard_error({"a": 0.5}, {"a": 64}) == pytest.approx(math.sqrt(0.25 / 64))
    both = binomial_standard_error({"a": 0.5, "b": 0.1}, {"a": 64, "b": 64})
    assert both == pytest.approx(math.sqrt(0.25 / 64 + 0.09 / 64) / 2)
    with pytest.raises(ValueError, match="images must be a size for every task"):
        binomial_standard_error({"a": 0.5}, {"b": 64})
