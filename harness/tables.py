"""Paper-style tables from a tidy results table (one row per evaluation).

Expected columns: ``variant``, ``seed``, one or more compute units (``compute/fwd_equiv``, …) and
metrics (``eval/overall``, …). Final scores are mean ± std over seeds of each run's last
evaluation. Compute-to-target is, per seed, the compute at the first evaluation whose metric
reaches the target; a variant with any seed that never reaches it is "not reached", never a
number. Speedups are ratios of mean compute-to-target with a percentile bootstrap CI over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Mean and std over seeds of each variant's final ``metrics``; columns ``<metric>/mean|std`` and ``seeds``."""
    _check_columns(df, unit, *metrics)
    last = final_rows(df, unit)
    grouped = last.groupby("variant")[metrics]
    out = grouped.mean().add_suffix("/mean").join(grouped.std(ddof=0).add_suffix("/std"))
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


def speedups(
    df: pd.DataFrame, metric: str, unit: str, target: float, reference: str, *, resamples: int = 2000, seed: int = 0
) -> list[TargetRow]:
    """Compute-to-target of every variant and its speedup over ``reference`` with a 95% bootstrap CI."""
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
        if np.isnan(ref).any():
            rows.append(TargetRow(variant, float(own.mean()), None, None))
            continue
        ratios = [
            rng.choice(ref, len(ref)).mean() / rng.choice(own, len(own)).mean() for _ in range(resamples)
        ]  # fmt: skip
        low, high = np.percentile(ratios, [2.5, 97.5])
        rows.append(TargetRow(variant, float(own.mean()), float(ref.mean() / own.mean()), (float(low), float(high))))
    return rows


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _target_cells(row: TargetRow, dash: str, times: str) -> tuple[str, str, str]:
    """(compute, speedup, CI) cells of one row; "not reached" never becomes a number."""
    if row.mean is None:
        return NOT_REACHED, dash, dash
    if row.speedup is None or row.ci is None:
        return _fmt(row.mean), dash, dash
    return _fmt(row.mean), f"{row.speedup:.2f}{times}", f"[{row.ci[0]:.2f}, {row.ci[1]:.2f}]"


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
    lines += [" & ".join((tex(row.variant), *_target_cells(row, "--", r"$\times$"))) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def final_scores_markdown(scores: pd.DataFrame, metrics: list[str]) -> str:
    """Mean ± std over seeds, best mean per metric in bold."""
    header = "| variant | seeds | " + " | ".join(m.removeprefix("eval/") for m in metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    best = {m: scores[f"{m}/mean"].max() for m in metrics}
    for variant, row in scores.iterrows():
        cells = []
        for m in metrics:
            text = f"{row[f'{m}/mean']:.3f} ± {row[f'{m}/std']:.3f}"
            cells.append(f"**{text}**" if row[f"{m}/mean"] == best[m] else text)
        lines.append(f"| {variant} | {int(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
