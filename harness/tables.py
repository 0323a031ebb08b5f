"""Paper-style tables from a tidy results table (one row per evaluation).

Expected columns: ``variant``, ``seed``, one or more compute units (``compute/fwd_equiv``, …) and
metrics (``eval/overall``, …). Final scores are mean ± std over seeds of each run's last
evaluation. Compute-to-target is "not reached" when the target is never reached, never a number.
Two definitions, both with a percentile bootstrap CI over seeds on the speedup:

* ``per_seed``: each seed's compute at its first evaluation reaching the target, averaged; any
  seed that never reaches it makes the variant "not reached". Speedup: ratio of the means.
* ``mean_curve`` (default for suite tables, whose seeds share eval points, column ``eval_point``):
  the first eval point at which the mean over seeds of the metric reaches the target, and the
  mean compute of the seeds there. Speedup: ratio of those computes; a bootstrap resample in
  which a variant never reaches the target counts as infinite compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

NOT_REACHED = "not reached"


def _check_columns(df: pd.DataFrame, *columns: str) -> None:
    missing = [c for c in ("variant", "seed", *columns) if c not in df.columns]
    if missing:
        raise KeyError(f"results table lacks columns {missing}; it has {list(df.columns)}")


def final_rows(df: pd.DataFrame, unit: str) -> pd.DataFrame:
    """Each (variant, seed)'s last evaluation by ``unit``."""
    _check_columns(df, unit)
    return df.sort_values(unit).groupby(["variant", "seed"], as_index=False).tail(1)


def final_scores(df: pd.DataFrame, metrics: list[str], unit: str = "compute/fwd_equiv") -> pd.DataFrame:
    """Mean and sample std (ddof 1) over seeds of each variant's final ``metrics``; ``<metric>/mean|std``, ``seeds``."""
    _check_columns(df, unit, *metrics)
    last = final_rows(df, unit)
    grouped = last.groupby("variant")[metrics]
    out = grouped.mean().add_suffix("/mean").join(grouped.std(ddof=1).add_suffix("/std"))
    out["seeds"] = last.groupby("variant")["seed"].nunique()
    return out


def compute_to_target(df: pd.DataFrame, metric: str, unit: str, target: float) -> pd.Series:
    """Per (variant, seed): ``unit`` at the first evaluation with ``metric >= target`` (NaN: never)."""
    _check_columns(df, unit, metric)
    ordered = df.sort_values(unit)
    reached = ordered[ordered[metric] >= target].groupby(["variant", "seed"])[unit].first()
    runs = ordered.groupby(["variant", "seed"]).size().index
    return reached.reindex(runs)


@dataclass(frozen=True)
class TargetRow:
    variant: str
    mean: float | None  # None: not reached by every seed
    speedup: float | None  # reference's mean / this mean
    ci: tuple[float, float] | None


def _seed_matrices(df: pd.DataFrame, metric: str, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """(seeds × eval points) arrays of ``unit`` and ``metric`` for one variant; every seed must share the points."""
    x = df.pivot_table(index="seed", columns="eval_point", values=unit, aggfunc="first")
    y = df.pivot_table(index="seed", columns="eval_point", values=metric, aggfunc="first")
    if x.isna().any().any() or y.isna().any().any():
        raise ValueError(f"seeds of variant {df['variant'].iloc[0]!r} were not evaluated at the same eval points")
    return x.to_numpy(dtype=float), y.to_numpy(dtype=float)


def _first_crossing(x: np.ndarray, y: np.ndarray, target: float) -> float:
    """Mean compute at the first point where the seed-mean metric reaches ``target`` (NaN: never)."""
    hits = np.flatnonzero(y.mean(axis=0) >= target)
    return float(x[:, hits[0]].mean()) if len(hits) else float("nan")


def mean_curve_to_target(df: pd.DataFrame, metric: str, unit: str, target: float) -> pd.Series:
    """Per variant: mean ``unit`` at the first eval point whose seed-mean ``metric`` reaches ``target``."""
    _check_columns(df, unit, metric, "eval_point")
    return pd.Series(
        {v: _first_crossing(*_seed_matrices(group, metric, unit), target) for v, group in df.groupby("variant")}
    )


def _mean_curve_speedups(
    df: pd.DataFrame, metric: str, unit: str, target: float, reference: str, resamples: int, seed: int
) -> list[TargetRow]:
    _check_columns(df, unit, metric, "eval_point")
    runs = {v: _seed_matrices(group, metric, unit) for v, group in df.groupby("variant")}
    if reference not in runs:
        raise KeyError(f"reference variant {reference!r} is not in the table; variants: {sorted(runs)}")
    rng = np.random.default_rng(seed)

    def resampled(variant: str) -> float:
        x, y = runs[variant]
        rows = rng.integers(0, len(x), len(x))
        return _first_crossing(x[rows], y[rows], target)

    ref = _first_crossing(*runs[reference], target)
    out = []
    for variant in sorted(runs):
        own = _first_crossing(*runs[variant], target)
        if np.isnan(own):
            out.append(TargetRow(variant, None, None, None))
            continue
        if np.isnan(ref) or ref == 0 or own == 0:  # 0: reached before any training
            out.append(TargetRow(variant, own, None, None))
            continue
        ratios = []
        for _ in range(resamples):
            r, o = resampled(reference), resampled(variant)
            ratios.append(np.inf if np.isnan(r) else 0.0 if np.isnan(o) else r / o)
        # No interpolation: a resample that never reaches the target is an infinite ratio (inf − inf is NaN).
        low, high = np.percentile(ratios, 2.5, method="lower"), np.percentile(ratios, 97.5, method="higher")
        out.append(TargetRow(variant, own, ref / own, (float(low), float(high))))
    return out


def speedups(
    df: pd.DataFrame, metric: str, unit: str, target: float, reference: str, *, resamples: int = 2000, seed: int = 0,
    mode: Literal["auto", "per_seed", "mean_curve"] = "auto",
) -> list[TargetRow]:  # fmt: skip
    """Compute-to-target of every variant and its speedup over ``reference`` with a 95% bootstrap CI.

    ``mode="auto"``: ``mean_curve`` when every row has an ``eval_point`` (suite tables), else ``per_seed``.
    """
    if mode == "auto":
        mode = "mean_curve" if "eval_point" in df.columns and df["eval_point"].notna().all() else "per_seed"
    if mode == "mean_curve":
        return _mean_curve_speedups(df, metric, unit, target, reference, resamples, seed)
    per_seed = compute_to_target(df, metric, unit, target)
    variants = sorted(per_seed.index.get_level_values("variant").unique())
    if reference not in variants:
        raise KeyError(f"reference variant {reference!r} is not in the table; variants: {variants}")
    rng = np.random.default_rng(seed)
    values = {v: per_seed.xs(v, level="variant").to_numpy(dtype=float) for v in variants}
    ref = values[reference]
    rows = []
    for variant in variants:
        own = values[variant]
        if np.isnan(own).any():
            rows.append(TargetRow(variant, None, None, None))
            continue
        if np.isnan(ref).any() or ref.mean() == 0 or own.mean() == 0:  # 0: reached before any training
            rows.append(TargetRow(variant, float(own.mean()), None, None))
            continue
        ratios = [
            rng.choice(ref, len(ref)).mean() / rng.choice(own, len(own)).mean() for _ in range(resamples)
        ]  # fmt: skip
        low, high = np.percentile(ratios, [2.5, 97.5])
        rows.append(TargetRow(variant, float(own.mean()), float(ref.mean() / own.mean()), (float(low), float(high))))
    return rows


def _fmt(value: float) -> str:
    if np.isinf(value):
        return "∞"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _target_cells(row: TargetRow, dash: str, times: str, infinity: str = "∞") -> tuple[str, str, str]:
    """(compute, speedup, CI) cells of one row; "not reached" never becomes a number."""
    if row.mean is None:
        return NOT_REACHED, dash, dash
    if row.speedup is None or row.ci is None:
        return _fmt(row.mean), dash, dash
    low, high = (f"{v:.2f}" if np.isfinite(v) else infinity for v in row.ci)
    return _fmt(row.mean), f"{row.speedup:.2f}{times}", f"[{low}, {high}]"


def speedup_markdown(rows: list[TargetRow], unit: str, target: float, reference: str) -> str:
    lines = [f"| variant | {unit} to reach {target:g} | speedup vs {reference} | 95% CI |", "|---|---|---|---|"]
    lines += ["| " + " | ".join((row.variant, *_target_cells(row, "–", "×"))) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def speedup_latex(rows: list[TargetRow], unit: str, target: float, reference: str) -> str:
    def tex(text: str) -> str:
        return text.replace("_", r"\_")

    lines = [
        r"\begin{tabular}{lrrr}",
        r"\toprule",
        f"variant & {tex(unit)} to {target:g} & speedup vs {tex(reference)} & 95\\% CI \\\\",
        r"\midrule",
    ]
    lines += [
        " & ".join((tex(row.variant), *_target_cells(row, "--", r"$\times$", r"$\infty$"))) + r" \\" for row in rows
    ]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def final_scores_markdown(scores: pd.DataFrame, metrics: list[str]) -> str:
    """Mean ± sample std over seeds (the mean alone for one seed), best mean per metric in bold."""
    header = "| variant | seeds | " + " | ".join(m.removeprefix("eval/") for m in metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    best = {m: scores[f"{m}/mean"].max() for m in metrics}
    for variant, row in scores.iterrows():
        cells = []
        for m in metrics:
            std = row[f"{m}/std"]
            text = f"{row[f'{m}/mean']:.3f}" + ("" if pd.isna(std) else f" ± {std:.3f}")  # one seed: no std
            cells.append(f"**{text}**" if row[f"{m}/mean"] == best[m] else text)
        lines.append(f"| {variant} | {int(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
