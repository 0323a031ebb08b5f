"""Paper-style efficiency curves from a tidy results table (matplotlib + seaborn, no LaTeX, no trackers).

One line per variant, the mean over seeds with a 95% bootstrap confidence band, metric against
any compute unit; per-task small multiples; each figure written as PNG and PDF.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from harness.atomic import atomic_write  # noqa: E402

UNIT_LABELS = {
    "compute/fwd_equiv": "policy forward-equivalents (fwd + 2·bwd)",
    "compute/flops": "training FLOPs",
    "compute/wall_seconds": "wall seconds (sampling + reward + training)",
    "compute/images_sampled": "images sampled",
    "iteration": "iterations",
}


def _save(figure: plt.Figure, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".png"), out.with_suffix(".pdf")]
    for path in paths:

        def write(f: IO[bytes], fmt: str = path.suffix[1:]) -> None:
            figure.savefig(f, format=fmt, dpi=150, bbox_inches="tight")

        atomic_write(path, write)
    plt.close(figure)
    return paths


def _check(df: pd.DataFrame, *columns: str) -> None:
    missing = [c for c in ("variant", "seed", *columns) if c not in df.columns]
    if missing:
        raise KeyError(f"results table lacks columns {missing}; it has {list(df.columns)}")


def matched_compute(df: pd.DataFrame, unit: str) -> pd.DataFrame:
    """Put each variant's seeds on common x values, so that seaborn averages them into one line with a band.

    Suites evaluate every seed at the same budget fractions (column ``eval_point``), but each seed
    reaches a fraction at a slightly different spent amount: x becomes the mean over seeds of
    ``unit`` at each eval point. Tables without eval points are returned unchanged.
    """
    if "eval_point" not in df.columns or df["eval_point"].isna().any():
        return df
    out = df.copy()
    out[unit] = out.groupby(["variant", "eval_point"])[unit].transform("mean")
    return out


def efficiency_curve(df: pd.DataFrame, metric: str, unit: str, out: Path, *, log_x: bool = False) -> list[Path]:
    """``metric`` against ``unit``: one line per variant, mean over seeds with a 95% CI band."""
    _check(df, metric, unit)
    df = matched_compute(df, unit)
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    sns.lineplot(data=df, x=unit, y=metric, hue="variant", errorbar=("ci", 95), marker="o", ax=axis)
    sns.move_legend(axis, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)  # never over the curves
    axis.set_xlabel(UNIT_LABELS.get(unit, unit))
    axis.set_ylabel(metric.removeprefix("eval/"))
    if log_x:
        axis.set_xscale("symlog")
    else:
        axis.xaxis.set_major_formatter(EngFormatter())  # 40k, 1.2M: compute counts are large
    axis.grid(alpha=0.3)
    return _save(figure, out)


def per_task_curves(df: pd.DataFrame, metrics: list[str], unit: str, out: Path, *, log_x: bool = False) -> list[Path]:
    """Small multiples: one panel per metric (e.g. per GenEval task)."""
    _check(df, unit, *metrics)
    df = matched_compute(df, unit)
    long = df.melt(id_vars=["variant", "seed", unit], value_vars=metrics, var_name="metric", value_name="score")
    long["metric"] = long["metric"].str.removeprefix("eval/")
    grid = sns.relplot(data=long, x=unit, y="score", hue="variant", col="metric", col_wrap=3, kind="line",
                       errorbar=("ci", 95), marker="o", height=2.6, aspect=1.2, facet_kws={"sharey": False})  # fmt: skip
    grid.set_axis_labels(UNIT_LABELS.get(unit, unit), "score")
    for axis in grid.axes.flat:
        if log_x:
            axis.set_xscale("symlog")
        else:
            axis.xaxis.set_major_formatter(EngFormatter())
    return _save(grid.figure, out)
