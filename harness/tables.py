"""Paper-style tables from a tidy results table; the statistics themselves are :mod:`harness.statistics`.

Input: one row per evaluation with ``variant``, ``seed``, compute units (``compute/fwd_equiv``, …)
and metrics (``eval/overall``, …); suite tables also have ``method`` and ``eval_point`` (0: the
untrained model). Every table is a :class:`Table` (a caption that states the seeds and the source
of the eval-sampling error, a header, rows of text) written as Markdown or LaTeX. No number is
printed for a target that was not reached, and no interval has an infinite end: a one-sided bound
is printed as "≥ x" with the share of bootstrap resamples that never reached the target.
docs/statistics.md defines every number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from harness.evaluate import EvalNoise
from harness.geneval_rules import TASKS
from harness.statistics import (
    RESAMPLES,
    Curves,
    Interval,
    Speedup,
    Target,
    ToTarget,
    crossings,
    difference_interval,
    improvement_interval,
    iqm,
    iqm_interval,
    mean_interval,
    probability_of_improvement,
    speedup,
    to_target,
    too_few_seeds,
)

NOT_REACHED = "not reached"
# Metrics where less is better (the shapes world's clutter count); every other metric is higher-is-better.
LOWER_IS_BETTER = frozenset({"eval/extra_objects"})
LATEX = (("_", r"\_"), ("%", r"\%"), ("±", r"$\pm$"), ("≥", r"$\geq$"), ("≤", r"$\leq$"), ("×", r"$\times$"),
         ("↓", r"$\downarrow$"), ("Δ", r"$\Delta$"), ("–", "--"), ("**", ""), ("†", r"$^\dagger$"))  # fmt: skip
INTERVAL_NOTE = (
    "95% intervals: stratified bootstrap over seeds, expanded percentile (docs/statistics.md); none below 3 seeds"
)


def _check_columns(df: pd.DataFrame, *columns: str) -> None:
    missing = [c for c in ("variant", "seed", *columns) if c not in df.columns]
    if missing:
        raise KeyError(f"results table lacks columns {missing}; it has {list(df.columns)}")


@dataclass(frozen=True)
class Table:
    """A caption, a header and rows of text cells, written as Markdown or LaTeX."""

    caption: str
    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [self.caption, "", "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        def tex(text: str) -> str:
            for plain, code in LATEX:
                text = text.replace(plain, code)
            return text

        lines = [f"% {tex(self.caption)}", r"\begin{tabular}{l" + "r" * (len(self.header) - 1) + "}", r"\toprule"]
        lines += [" & ".join(tex(h) for h in self.header) + r" \\", r"\midrule"]
        lines += [" & ".join(tex(c) for c in row) + r" \\" for row in self.rows]
        return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"]) + "\n"


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _interval_text(interval: Interval | None, digits: int = 3) -> str:
    if interval is None:
        return "–"
    return f"[{interval.low:.{digits}f}, {interval.high:.{digits}f}]"


# --- reading curves ---------------------------------------------------------------------------------------------


def final_rows(df: pd.DataFrame, unit: str) -> pd.DataFrame:
    """Each (variant, seed)'s last evaluation by ``unit``."""
    _check_columns(df, unit)
    return df.sort_values(unit).groupby(["variant", "seed"], as_index=False).tail(1)


def _pivot(group: pd.DataFrame, metric: str, unit: str) -> tuple[list[int], Curves]:
    rows = group.sort_values(["seed", unit]).drop_duplicates(["seed", unit], keep="last")
    rows = rows.assign(_point=rows.groupby("seed").cumcount())
    x = rows.pivot(index="seed", columns="_point", values=unit)
    y = rows.pivot(index="seed", columns="_point", values=metric)
    return list(x.index), Curves(x.to_numpy(dtype=float), y.to_numpy(dtype=float))


def variant_curves(df: pd.DataFrame, metric: str, unit: str) -> dict[str, Curves]:
    """Per variant, its seeds' evaluations as (seeds × points) arrays, in ``unit`` order."""
    _check_columns(df, unit, metric)
    kept = df.dropna(subset=[metric, unit])
    return {str(variant): _pivot(group, metric, unit)[1] for variant, group in kept.groupby("variant")}


def compute_to_target(df: pd.DataFrame, metric: str, unit: str, target: float) -> pd.Series:
    """Per (variant, seed): ``unit`` where ``metric`` first reaches ``target``, interpolated (NaN: never)."""
    _check_columns(df, unit, metric)
    values = {}
    for variant, group in df.dropna(subset=[metric, unit]).groupby("variant"):
        seeds, curves = _pivot(group, metric, unit)
        each = crossings(curves.x, curves.y, target)
        values.update({(variant, seed): float(c) for seed, c in zip(seeds, each, strict=True)})
    return pd.Series(values).rename_axis(["variant", "seed"])


# --- final scores -----------------------------------------------------------------------------------------------


def final_scores(
    df: pd.DataFrame, metrics: list[str], unit: str = "compute/fwd_equiv", noise: EvalNoise | None = None,
    *, resamples: int = RESAMPLES, seed: int = 0,
) -> pd.DataFrame:  # fmt: skip
    """Per variant and metric: seed mean of the final scores, its interval (NaN below 3 seeds) and eval SE.

    Columns ``<metric>/mean|low|high|eval_se|se_source`` and ``seeds``.
    """
    _check_columns(df, unit, *metrics)
    noise = noise or EvalNoise()
    last = final_rows(df, unit)
    records = {}
    for variant, rows in last.groupby("variant"):
        record: dict[str, object] = {"seeds": rows["seed"].nunique()}
        for m in metrics:
            values = rows[m].to_numpy(dtype=float)
            interval = mean_interval(values, resamples=resamples, seed=seed)
            se, source = noise.standard_error(rows, m)
            record |= {f"{m}/mean": values.mean(), f"{m}/low": interval.low if interval else math.nan,
                       f"{m}/high": interval.high if interval else math.nan, f"{m}/eval_se": se,
                       f"{m}/se_source": source}  # fmt: skip
        records[str(variant)] = record
    return pd.DataFrame.from_dict(records, orient="index")


def _score_cell(row: pd.Series, metric: str) -> str:
    text = f"{row[f'{metric}/mean']:.3f}"
    if not math.isnan(row[f"{metric}/low"]):
        text += f" [{row[f'{metric}/low']:.3f}, {row[f'{metric}/high']:.3f}]"
    se = row[f"{metric}/eval_se"]
    if not math.isnan(se):
        text += f" ±{se:.3f}" + ("†" if row[f"{metric}/se_source"] == "binomial" else "")
    return text


def final_scores_table(scores: pd.DataFrame, metrics: list[str], noise: EvalNoise | None = None) -> Table:
    """Seed mean [95% interval over seeds] ±eval SE per metric, the best mean in bold."""
    noise = noise or EvalNoise()
    seeds = scores["seeds"].astype(int)
    caption = (
        f"Final scores (each run's last evaluation): seed mean [95% interval over seeds] ±eval-sampling SE; "
        "the best mean in bold (↓: lower is better). "
        f"Seeds per variant: {_seed_counts(seeds)}. {INTERVAL_NOTE}. Eval SE: {noise.describe(scores, metrics)}."
    )
    if seeds.min() < 3:
        caption += f" No interval for variants with < 3 seeds ({', '.join(seeds[seeds < 3].index)})."
    best = {m: scores[f"{m}/mean"].min() if m in LOWER_IS_BETTER else scores[f"{m}/mean"].max() for m in metrics}
    rows = []
    for variant, row in scores.iterrows():
        cells = [_score_cell(row, m) for m in metrics]
        cells = [f"**{c}**" if row[f"{m}/mean"] == best[m] else c for c, m in zip(cells, metrics, strict=True)]
        rows.append([str(variant), str(int(row["seeds"])), *cells])
    names = [m.removeprefix("eval/") + (" ↓" if m in LOWER_IS_BETTER else "") for m in metrics]
    return Table(caption, ["variant", "seeds", *names], rows)


def _seed_counts(seeds: pd.Series) -> str:
    counts = seeds.value_counts()
    if len(counts) == 1:
        return str(int(counts.index[0]))
    return ", ".join(f"{variant} {int(n)}" for variant, n in seeds.items())


# --- compute to target ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetRow:
    variant: str
    to_target: ToTarget
    speedup: Speedup | None  # None: the reference itself


def target_rows(
    df: pd.DataFrame, metric: str, unit: str, target: Target, reference: str,
    *, resamples: int = RESAMPLES, seed: int = 0,
) -> tuple[float, list[TargetRow]]:  # fmt: skip
    """The target score and every variant's compute-to-target and speedup over ``reference``."""
    curves = variant_curves(df, metric, unit)
    if reference not in curves:
        raise KeyError(f"reference variant {reference!r} is not in the table; variants: {sorted(curves)}")
    ref = curves[reference]
    tau = float(target.resolve(ref.base.mean(), ref.final.mean()))
    rows = []
    for variant in sorted(curves):
        ratio = None
        if variant != reference:
            ratio = speedup(ref, curves[variant], target, resamples=resamples, seed=seed)
        rows.append(TargetRow(variant, to_target(curves[variant], tau), ratio))
    return tau, rows


def _compute_cell(t: ToTarget) -> str:
    if t.reached == 0:
        return NOT_REACHED
    return _fmt(t.mean) if t.complete else f"≥ {_fmt(t.mean)}"


def _ratio(value: float) -> str:
    return f"{value:.3g}×"


def _speedup_cells(s: Speedup | None) -> tuple[str, str]:
    if s is None:
        return "1 (reference)", "–"
    if s.bound == "?":
        return "–", s.note
    value = {"=": "", ">=": "≥ ", "<=": "≤ "}[s.bound] + _ratio(s.value)
    if s.interval is None:
        return value, s.note
    low, high, unreached = s.interval.low, s.interval.high, s.interval.unreached
    share = f"{unreached:.0%} of resamples unreached"
    if math.isfinite(high) and low > 0:
        return value, f"[{low:.3g}, {high:.3g}]" + (f" ({share})" if unreached else "")
    if low > 0:
        return value, f"≥ {_ratio(low)} ({share})"
    if math.isfinite(high):
        return value, f"≤ {_ratio(high)} ({share})"
    return value, f"no bound ({share})"


def target_table(
    tau: float, rows: list[TargetRow], metric: str, unit: str, target: Target, reference: str, eval_se: float
) -> Table:
    """Compute-to-target and speedups, with the target, the seeds and the eval SE in the caption."""
    name = metric.removeprefix("eval/")
    se = f"; eval SE of {name} about ±{eval_se:.3f}" if math.isfinite(eval_se) else ""
    caption = (
        f"Compute to reach {name} = {tau:.3f} ({target.describe(reference)}{se}), in `{unit}`: per seed, linear "
        "interpolation between eval points, never past the last one; the seed mean (≥: some seeds never reached it, "
        f"counted at their last evaluation). Speedup: {reference}'s seed mean over the variant's. {INTERVAL_NOTE}."
    )
    table_rows = []
    for row in rows:
        t = row.to_target
        table_rows.append([row.variant, f"{t.reached}/{t.seeds}", _compute_cell(t), *_speedup_cells(row.speedup)])
    header = ["variant", "seeds reaching", f"{unit} to target", f"speedup vs {reference}", "95% interval"]
    return Table(caption, header, table_rows)


# --- quality at matched compute -------------------------------------------------------------------------------


def matched_table(
    df: pd.DataFrame, metric: str, unit: str, reference: str, noise: EvalNoise | None = None,
    *, resamples: int = RESAMPLES, seed: int = 0,
) -> Table:  # fmt: skip
    """Each variant's score at each eval point and its difference to ``reference`` there (same eval points)."""
    _check_columns(df, unit, metric, "eval_point")
    noise = noise or EvalNoise()
    scheduled = df.dropna(subset=["eval_point"])
    ref_points = dict(tuple(scheduled[scheduled["variant"] == reference].groupby("eval_point")))
    if not ref_points:
        raise KeyError(f"reference variant {reference!r} has no scheduled evaluations; variants: "
                       f"{sorted(df['variant'].unique())}")  # fmt: skip
    rows = []
    for (variant, point), group in scheduled.groupby(["variant", "eval_point"]):
        ref = ref_points.get(point)
        if ref is None:
            continue
        values, ref_values = group[metric].to_numpy(dtype=float), ref[metric].to_numpy(dtype=float)
        cells = [str(variant), f"{int(point)}", _fmt(group[unit].mean()), str(len(values)), f"{values.mean():.3f}"]
        if variant == reference:
            rows.append([*cells, "–", "–", "–"])
            continue
        interval = difference_interval(values, ref_values, resamples=resamples, seed=seed)
        paired = noise.paired_standard_error(group, ref, metric)
        reason = too_few_seeds(len(values), len(ref_values))
        rows.append([*cells, f"{values.mean() - ref_values.mean():+.3f}",
                     _interval_text(interval) if interval else str(reason),
                     f"±{paired:.3f}" if math.isfinite(paired) else "–"])  # fmt: skip
    caption = (
        f"{metric.removeprefix('eval/')} at each eval point (0: the untrained model) and its difference Δ to "
        f"{reference} at the same point: seed means; Δ's 95% interval over seeds ({INTERVAL_NOTE.split(': ')[1]}); "
        f"Δ's eval-sampling SE, paired prompt by prompt (same eval prompts and noise for every variant): "
        f"{noise.describe_paired()}."
    )
    header = ["variant", "eval point", f"{unit} (seed mean)", "seeds", "score", f"Δ vs {reference}",
              "Δ 95% interval", "Δ paired eval SE"]  # fmt: skip
    return Table(caption, header, rows)


# --- aggregates -------------------------------------------------------------------------------------------------


def task_metrics(df: pd.DataFrame, metric: str) -> list[str]:
    """The per-task metric columns (GenEval's tasks) present in ``df``; else ``[metric]``."""
    tasks = [f"eval/{t}" for t in TASKS if f"eval/{t}" in df.columns]
    return tasks or [metric]


def aggregate_table(
    df: pd.DataFrame, tasks: list[str], unit: str, reference: str | None,
    *, resamples: int = RESAMPLES, seed: int = 0,
) -> Table:  # fmt: skip
    """rliable's aggregates of the final scores: IQM over seeds × tasks, and P(variant > reference)."""
    _check_columns(df, unit, *tasks)
    last = final_rows(df, unit)
    scores = {str(v): rows[tasks].to_numpy(dtype=float) for v, rows in last.groupby("variant")}
    if reference is not None and reference not in scores:
        raise KeyError(f"reference variant {reference!r} is not in the table; variants: {sorted(scores)}")
    rows = []
    for variant, values in sorted(scores.items()):
        interval = iqm_interval(values, resamples=resamples, seed=seed)
        cells = [variant, str(len(values)), f"{float(iqm(values)):.3f}",
                 _interval_text(interval) if interval else str(too_few_seeds(len(values)))]  # fmt: skip
        if reference is not None:
            if variant == reference:
                cells += ["–", "–"]
            else:
                poi = probability_of_improvement(values, scores[reference])
                poi_interval = improvement_interval(values, scores[reference], resamples=resamples, seed=seed)
                reason = too_few_seeds(len(values), len(scores[reference]))
                cells += [f"{float(poi):.2f}", _interval_text(poi_interval, 2) if poi_interval else str(reason)]
        rows.append(cells)
    names = ", ".join(t.removeprefix("eval/") for t in tasks)
    caption = (
        f"Aggregates of the final scores over seeds × tasks ({names}), as rliable defines them: the interquartile "
        "mean (IQM) and the probability that a random seed of the variant beats a random seed of "
        f"{reference} on a random task (ties count ½). {INTERVAL_NOTE}, seeds resampled within each task."
    )
    header = ["variant", "seeds", "IQM", "IQM 95% interval"]
    if reference is not None:
        header += [f"P(> {reference})", "P 95% interval"]
    return Table(caption, header, rows)
