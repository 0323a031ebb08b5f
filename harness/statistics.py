"""The statistics of a comparison, as pure functions on arrays; docs/statistics.md defines each one.

* **Compute-to-target** (:func:`crossings`): per seed, linear interpolation between consecutive eval
  points, never extrapolated past the last one (NaN: "not reached").
* **Targets** (:class:`Target`): an absolute score, the reference's final seed-mean score, or a
  fraction f of the reference's final seed-mean gain over the untrained model.
* **Intervals**: a bootstrap over seeds, stratified (each variant, and each task, resampled on its
  own), read with Hesterberg's *expanded percentile* interval, which keeps its nominal coverage with
  3–10 seeds where the plain percentile interval does not (T. Hesterberg, "What teachers should know
  about the bootstrap", The American Statistician 69(4), 2015, §5.2). Below :data:`MIN_SEEDS` seeds
  there is no interval. A resample in which some drawn seed never reaches the target bounds its
  ratio on one side only, so such an interval is one-sided, never "[x, ∞]".
* **Aggregates** as rliable defines them (Agarwal et al., "Deep RL at the Edge of the Statistical
  Precipice", NeurIPS 2021): the interquartile mean over seeds × tasks and the probability of
  improvement, with numpy (rliable would add arch and statsmodels, and cannot carry censored resamples).
* **Eval-sampling error**: a bootstrap over eval prompts, stratified by task, of a metric that is the
  unweighted mean over tasks of each task's mean over prompts (GenEval's ``overall``); or, where
  per-prompt outcomes were not stored, the analytic binomial error of the per-task accuracies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import stats

from harness.validation import require

Array = npt.NDArray[np.float64]
ALPHA = 0.05  # every interval is a 95% interval
MIN_SEEDS = 3  # fewer seeds per variant: no interval
RESAMPLES = 5000
TargetKind = Literal["absolute", "reference_final", "reference_gain"]
TARGET_KINDS: tuple[TargetKind, ...] = ("absolute", "reference_final", "reference_gain")
DEFAULT_GAIN = 0.8  # the reports' target: 80% of the reference's final gain, which the reference reaches in expectation


# --- compute-to-target ---------------------------------------------------------------------------------------


def crossings(x: Array, y: Array, targets: Array | float) -> Array:
    """Where each seed's curve first reaches each target: linear interpolation between eval points.

    ``x``, ``y``: (S, P) compute and score of each seed's evaluations, ``x`` increasing along a row,
    rows padded with NaN at the end. ``targets``: a number, or (B,) targets. Returns (S,) or (S, B);
    NaN where the curve never reaches the target by its last evaluation (never extrapolated). A curve
    that starts at or above the target crosses at its first point.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    scalar = np.ndim(targets) == 0
    tau = np.atleast_1d(np.asarray(targets, dtype=float))  # (B,)
    reached = y[:, None, :] >= tau[None, :, None]  # (S, B, P); NaN pads compare False
    first = reached.argmax(axis=2)  # (S, B)
    before = np.maximum(first - 1, 0)
    rows = np.arange(len(x))[:, None]
    x1, y1, x0, y0 = x[rows, first], y[rows, first], x[rows, before], y[rows, before]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = x0 + (tau[None, :] - y0) / (y1 - y0) * (x1 - x0)
    out = np.where(first == 0, x1, between)
    out = np.where(reached.any(axis=2), out, np.nan)
    return out[:, 0] if scalar else out


@dataclass(frozen=True)
class Curves:
    """One variant's evaluations: (seeds × eval points) compute ``x`` and score ``y``, rows NaN-padded."""

    x: Array
    y: Array

    def __post_init__(self) -> None:
        require(self.x.shape == self.y.shape and self.x.ndim == 2 and len(self.x) > 0, "x", self.x.shape,
                f"a (seeds, points) array shaped as y {self.y.shape}")  # fmt: skip
        require(bool(np.all(~np.isnan(self.x[:, 0]))), "x", self.x[:, 0].tolist(), "an evaluation per seed")
        steps = np.diff(self.x, axis=1)
        require(bool(np.all((steps > 0) | np.isnan(steps))), "x", self.x.tolist(), "increasing along each seed")

    @property
    def seeds(self) -> int:
        return len(self.x)

    def _last(self) -> npt.NDArray[np.intp]:
        return (~np.isnan(self.x)).sum(axis=1) - 1

    @property
    def last_x(self) -> Array:
        """(S,) compute at each seed's last evaluation."""
        return self.x[np.arange(self.seeds), self._last()]

    @property
    def final(self) -> Array:
        """(S,) score at each seed's last evaluation."""
        return self.y[np.arange(self.seeds), self._last()]

    @property
    def base(self) -> Array:
        """(S,) score at each seed's first evaluation (in suites, the untrained model, shared by every seed)."""
        return self.y[:, 0]


@dataclass(frozen=True)
class Target:
    """What to reach: ``absolute`` (``value`` is the score), ``reference_final`` (the reference's final
    seed-mean score) or ``reference_gain`` (``base + value·(final − base)`` of the reference: a
    fraction of its final seed-mean gain over its first evaluation, the untrained model)."""

    kind: TargetKind = "reference_gain"
    value: float = DEFAULT_GAIN

    def __post_init__(self) -> None:
        require(self.kind in TARGET_KINDS, "kind", self.kind, f"one of {', '.join(TARGET_KINDS)}")
        require(math.isfinite(self.value), "value", self.value, "a finite number")
        if self.kind == "reference_gain":
            require(0 < self.value <= 1, "value", self.value, "a fraction of the reference's gain in (0, 1]")

    @property
    def fraction(self) -> float:
        return 1.0 if self.kind == "reference_final" else self.value

    def resolve(self, base: Array | float, final: Array | float) -> Array:
        """The target score(s) given the reference's seed-mean ``base`` and ``final`` score(s)."""
        if self.kind == "absolute":
            return np.full(np.shape(final), self.value, dtype=float)
        return np.asarray(base + self.fraction * (np.asarray(final) - base), dtype=float)

    def describe(self, reference: str | None) -> str:
        if self.kind == "absolute":
            return f"an absolute score of {self.value:g}"
        if self.kind == "reference_final":
            return f"{reference}'s final seed-mean score"
        return f"{self.value:.0%} of {reference}'s final seed-mean gain over the untrained model"


@dataclass(frozen=True)
class ToTarget:
    """A variant's seed-mean compute-to-target; a lower bound when some seeds never reach it."""

    mean: float  # unreached seeds count at their last evaluation's compute
    reached: int
    seeds: int

    @property
    def complete(self) -> bool:
        return self.reached == self.seeds


def to_target(curves: Curves, target: float) -> ToTarget:
    """Seed-mean compute-to-target of one variant (see :class:`ToTarget`)."""
    each = crossings(curves.x, curves.y, target)
    reached = ~np.isnan(each)
    mean = float(np.where(reached, each, curves.last_x).mean())
    return ToTarget(mean, int(reached.sum()), curves.seeds)


# --- intervals --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A 95% interval; ``high = inf``: no upper end (``low = 0`` for ratios: no lower end)."""

    low: float
    high: float
    unreached: float = 0.0  # share of resamples in which some drawn seed never reached the target


def expanded_alpha(n: int, alpha: float = ALPHA) -> float:
    """Hesterberg's expanded percentile level: z_{α'/2} = √(n/(n−1)) · t_{α/2, n−1}."""
    return float(2 * stats.norm.sf(math.sqrt(n / (n - 1)) * stats.t.isf(alpha / 2, n - 1)))


def too_few_seeds(*seeds: int) -> str | None:
    """Why there is no interval (None: there is one)."""
    n = min(seeds)
    return f"no interval: {n} seed{'s' if n != 1 else ''} (< {MIN_SEEDS})" if n < MIN_SEEDS else None


def _quantiles(low: Array, high: Array, n: int, alpha: float) -> tuple[float, float]:
    level = expanded_alpha(n, alpha) / 2  # order statistics, no interpolation: the ends may be infinite
    return float(np.quantile(low, level, method="lower")), float(np.quantile(high, 1 - level, method="higher"))


def bootstrap_interval(
    samples: Sequence[Array],
    statistic: Callable[[list[Array]], Array],
    *,
    by_column: bool = False,
    resamples: int = RESAMPLES,
    seed: int = 0,
    alpha: float = ALPHA,
) -> Interval | None:
    """Stratified bootstrap over seeds: each sample (S_i, ...) resampled along its rows on its own.

    ``statistic`` maps the resampled arrays, each (B, S_i, ...), to (B,) values. ``by_column``:
    (S_i, T) samples are resampled within each column (task) independently, as rliable's stratified
    bootstrap. None below :data:`MIN_SEEDS` seeds.
    """
    if too_few_seeds(*(len(s) for s in samples)):
        return None
    rng = np.random.default_rng(seed)
    drawn = []
    for sample in samples:
        n = len(sample)
        if by_column:
            columns = np.arange(sample.shape[1])
            drawn.append(sample[rng.integers(0, n, (resamples, n, sample.shape[1])), columns])
        else:
            drawn.append(sample[rng.integers(0, n, (resamples, n))])
    values = statistic(drawn)
    return Interval(*_quantiles(values, values, min(len(s) for s in samples), alpha))


def mean_interval(values: Array, *, resamples: int = RESAMPLES, seed: int = 0) -> Interval | None:
    """Interval of a seed mean."""
    return bootstrap_interval([np.asarray(values, dtype=float)], lambda d: d[0].mean(axis=1),
                              resamples=resamples, seed=seed)  # fmt: skip


def difference_interval(
    values: Array, reference: Array, *, resamples: int = RESAMPLES, seed: int = 0
) -> Interval | None:
    """Interval of a difference of seed means (independent seeds: each side resampled on its own)."""
    samples = [np.asarray(values, dtype=float), np.asarray(reference, dtype=float)]
    return bootstrap_interval(samples, lambda d: d[0].mean(axis=1) - d[1].mean(axis=1),
                              resamples=resamples, seed=seed)  # fmt: skip


# --- speedups ---------------------------------------------------------------------------------------------------

Bound = Literal["=", ">=", "<=", "?"]


@dataclass(frozen=True)
class Speedup:
    """Ratio of seed-mean compute-to-target, reference over variant; ``bound`` says how far it is known.

    ``">="``: some reference seed never reached the target (its compute is a lower bound), ``"<="``: some
    variant seed did not, ``"?"``: both, or the variant reached it before any training (no ratio).
    """

    value: float
    bound: Bound
    interval: Interval | None
    note: str = ""  # why there is no interval or no ratio


def _ratio_range(ref: Array, ref_last: Array, var: Array, var_last: Array) -> tuple[Array, Array]:
    """Bounds of the ratio of seed means (..., S) → (...): a seed that never reaches the target needs more
    compute than its last evaluation, so its side of the ratio is bounded on one side only."""
    ref_low = np.where(np.isnan(ref), ref_last, ref).mean(axis=-1)
    var_low = np.where(np.isnan(var), var_last, var).mean(axis=-1)
    ref_high = np.where(np.isnan(ref).any(axis=-1), np.inf, ref_low)
    var_high = np.where(np.isnan(var).any(axis=-1), np.inf, var_low)
    with np.errstate(divide="ignore", invalid="ignore"):
        low, high = ref_low / var_high, ref_high / var_low
    return np.nan_to_num(low, nan=0.0, posinf=np.inf), np.nan_to_num(high, nan=np.inf, posinf=np.inf)


def _bound(low: float, high: float) -> tuple[float, Bound]:
    if not math.isfinite(low):  # the variant reached the target before any training: no ratio
        return math.nan, "?"
    if low == high:
        return low, "="
    if math.isfinite(high) and low == 0:
        return high, "<="
    if low > 0 and not math.isfinite(high):
        return low, ">="
    return math.nan, "?"


def _no_ratio(ref: Array, var: Array) -> str:
    """Why no ratio is known."""
    if np.isnan(var).all():
        return "not reached"
    if np.nanmax(var) == 0:
        return "reached by the untrained model"
    return "no bound: some seeds of both never reached it" if np.isnan(ref).any() else "no ratio"


def _resampled_crossings(curves: Curves, targets: Array, rows: npt.NDArray[np.intp]) -> tuple[Array, Array]:
    """(B, S) crossings of the drawn seeds ``rows`` (B, S), each resample b at its own target b."""
    every = crossings(curves.x, curves.y, targets)  # (S, B)
    return every[rows, np.arange(len(targets))[:, None]], curves.last_x[rows]


def speedup(
    reference: Curves, variant: Curves, target: Target, *, resamples: int = RESAMPLES, seed: int = 0
) -> Speedup:
    """Speedup of ``variant`` over ``reference`` at ``target``, with its stratified-bootstrap interval.

    Each resample draws the reference's seeds and the variant's seeds with replacement, each on its
    own; a target defined by the reference is recomputed from the drawn reference seeds, so the
    interval carries the target's own uncertainty.
    """
    tau = float(target.resolve(reference.base.mean(), reference.final.mean()))
    ref, var = crossings(reference.x, reference.y, tau), crossings(variant.x, variant.y, tau)
    low, high = _ratio_range(ref, reference.last_x, var, variant.last_x)
    value, bound = _bound(float(low), float(high))
    if bound == "?":
        return Speedup(value, bound, None, _no_ratio(ref, var))
    reason = too_few_seeds(reference.seeds, variant.seeds)
    if reason:
        return Speedup(value, bound, None, reason)
    rng = np.random.default_rng(seed)
    ref_rows = rng.integers(0, reference.seeds, (resamples, reference.seeds))
    var_rows = rng.integers(0, variant.seeds, (resamples, variant.seeds))
    targets = target.resolve(reference.base[ref_rows].mean(axis=1), reference.final[ref_rows].mean(axis=1))
    ref_b, ref_last = _resampled_crossings(reference, targets, ref_rows)
    var_b, var_last = _resampled_crossings(variant, targets, var_rows)
    lows, highs = _ratio_range(ref_b, ref_last, var_b, var_last)
    unreached = float((np.isnan(ref_b).any(axis=1) | np.isnan(var_b).any(axis=1)).mean())
    interval_low, interval_high = _quantiles(lows, highs, min(reference.seeds, variant.seeds), ALPHA)
    return Speedup(value, bound, Interval(interval_low, interval_high, unreached))


# --- aggregates (rliable's definitions) ------------------------------------------------------------------------


def iqm(scores: Array) -> Array:
    """Interquartile mean over the last two axes (seeds × tasks): the mean of the middle 50% of the scores."""
    flat = np.asarray(scores, dtype=float).reshape(*np.shape(scores)[:-2], -1)
    return np.asarray(stats.trim_mean(flat, 0.25, axis=-1), dtype=float)


def probability_of_improvement(scores: Array, reference: Array) -> Array:
    """P(X > Y) + ½·P(X = Y) for a random seed of each, averaged over tasks: (..., S, T), (..., R, T) → (...)."""
    x, y = np.asarray(scores, dtype=float), np.asarray(reference, dtype=float)
    wins = (x[..., :, None, :] > y[..., None, :, :]) + 0.5 * (x[..., :, None, :] == y[..., None, :, :])
    return np.asarray(wins.mean(axis=(-3, -2)).mean(axis=-1), dtype=float)


def iqm_interval(scores: Array, *, resamples: int = RESAMPLES, seed: int = 0) -> Interval | None:
    """Interval of the IQM, seeds resampled within each task."""
    return bootstrap_interval([scores], lambda d: iqm(d[0]), by_column=True, resamples=resamples, seed=seed)


def improvement_interval(
    scores: Array, reference: Array, *, resamples: int = RESAMPLES, seed: int = 0
) -> Interval | None:
    """Interval of the probability of improvement, each side's seeds resampled within each task."""
    return bootstrap_interval([scores, reference], lambda d: probability_of_improvement(d[0], d[1]),
                              by_column=True, resamples=resamples, seed=seed)  # fmt: skip


# --- eval-sampling error ---------------------------------------------------------------------------------------


def _strata(tags: Sequence[str]) -> list[npt.NDArray[np.intp]]:
    order = list(dict.fromkeys(tags))
    tag_array = np.asarray(tags)
    return [np.flatnonzero(tag_array == tag) for tag in order]


def prompt_metric(values: Array, tags: Sequence[str]) -> Array:
    """A metric from per-prompt values (..., N): the unweighted mean over tasks of each task's mean over its
    prompts, prompts without a value (NaN) left out (GenEval's ``overall``; a per-task metric; a plain mean)."""
    values = np.asarray(values, dtype=float)
    means = []
    for stratum in _strata(tags):
        part = values[..., stratum]
        if not np.isnan(part).all():
            means.append(np.nanmean(part, axis=-1))
    return np.mean(means, axis=0) if means else np.full(values.shape[:-1], np.nan)


def eval_standard_error(values: Array, tags: Sequence[str], *, resamples: int = 2000, seed: int = 0) -> float:
    """Standard error of :func:`prompt_metric` from sampling the eval prompts: a bootstrap over prompts
    resampled within each task (the eval set fixes how many prompts each task has)."""
    values = np.asarray(values, dtype=float)
    require(values.ndim == 1 and len(values) == len(tags), "values", values.shape, f"({len(tags)},), one per tag")
    rng = np.random.default_rng(seed)
    means = []
    for stratum in _strata(tags):
        part = values[stratum][~np.isnan(values[stratum])]
        if len(part):
            means.append(part[rng.integers(0, len(part), (resamples, len(part)))].mean(axis=1))
    return float(np.std(np.mean(means, axis=0), ddof=1)) if means else math.nan


def paired_difference(
    values: Array, reference: Array, tags: Sequence[str], *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Difference of two variants' metrics and its eval-sampling standard error, paired by prompt.

    ``values`` (S, N), ``reference`` (R, N): per-prompt scores of each seed on the same eval prompts
    and initial noise. Each side is averaged over its seeds per prompt; the per-prompt differences are
    resampled, so the prompts' shared difficulty cancels (the pairing is what makes the error small).
    """
    difference = np.asarray(values, dtype=float).mean(axis=0) - np.asarray(reference, dtype=float).mean(axis=0)
    return float(prompt_metric(difference, tags)), eval_standard_error(difference, tags, resamples=resamples, seed=seed)


def binomial_standard_error(accuracies: Mapping[str, float], images: Mapping[str, int]) -> float:
    """Analytic standard error of the unweighted mean of per-task accuracies, each over ``images[task]``
    independent 0/1 judgements: √(Σ p(1−p)/n) / T. It ignores that a prompt's images share the prompt."""
    require(set(accuracies) <= set(images), "images", sorted(images), f"a size for every task of {sorted(accuracies)}")
    variance = sum(p * (1 - p) / images[task] for task, p in accuracies.items())
    return math.sqrt(variance) / len(accuracies) if accuracies else math.nan
