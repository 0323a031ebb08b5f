"""Paper figures from a tidy results table: matplotlib only (no LaTeX, no trackers), each as PNG and vector PDF.

* :func:`efficiency_curve`: a metric against a compute unit. Each variant is a thin line per seed
  under its seed mean, with a band that says what it is: the 95% bootstrap interval of the mean
  with ≥ 5 seeds, the min–max over seeds below that (docs/statistics.md).
* :func:`per_task_curves`: the same as small multiples, one panel per metric.
* :func:`speedup_chart`: each variant's speedup over the reference with its interval; a one-sided
  bound is an arrow towards the unknown end.

Colours: one hue per method family from the Okabe–Ito palette (colour-blind safe); within a family,
each variant has its own line style and every variant its own marker, so that eleven variants
stay apart in greyscale print.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from harness.atomic import atomic_write  # noqa: E402
from harness.statistics import mean_interval  # noqa: E402
from harness.tables import TargetRow  # noqa: E402

UNIT_LABELS = {
    "compute/fwd_equiv": "policy forward-equivalents (fwd + 2·bwd)",
    "compute/flops": "training FLOPs",
    "compute/wall_seconds": "wall seconds (sampling + reward + training)",
    "compute/images_sampled": "images sampled",
    "iteration": "iterations",
}
# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
LINESTYLES: tuple[Any, ...] = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8")
BAND_SEEDS = 5  # from this many seeds the band is a bootstrap interval of the mean; below, the min–max
PLOT_RESAMPLES = 2000


@dataclass(frozen=True)
class Style:
    color: str
    linestyle: Any
    marker: str


def _save(figure: plt.Figure, out: Path) -> list[Path]:
    paths = [out.with_suffix(".png"), out.with_suffix(".pdf")]
    with plt.rc_context({"pdf.fonttype": 42}):  # TrueType in the PDF: text stays text
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


def families(methods: Mapping[str, str]) -> dict[str, str]:
    """Variant → method family: its method, or a shorter method name it extends (flow_grpo_fast → flow_grpo)."""
    names = set(methods.values())
    out = {}
    for variant, method in methods.items():
        parents = [n for n in names if method.startswith(n + "_")]
        out[variant] = min(parents, key=len) if parents else method
    return out


def variant_styles(df: pd.DataFrame) -> dict[str, Style]:
    """A colour per method family (column ``method``; else each variant is its own family), and a line
    style within the family and a marker per variant, in sorted variant order."""
    variants = sorted(str(v) for v in df["variant"].unique())
    methods = dict(zip(df["variant"].astype(str), df["method"].astype(str), strict=False)) if "method" in df else {}
    family = families({v: methods.get(v, v) for v in variants})
    order = list(dict.fromkeys(family[v] for v in variants))
    styles, within = {}, dict.fromkeys(order, 0)
    for i, variant in enumerate(variants):
        f = family[variant]
        styles[variant] = Style(PALETTE[order.index(f) % len(PALETTE)], LINESTYLES[within[f] % len(LINESTYLES)],
                                MARKERS[i % len(MARKERS)])  # fmt: skip
        within[f] += 1
    return styles


@dataclass(frozen=True)
class _Summary:
    """One variant's curve: each seed's (x, y), and per eval point the mean x, mean y and band."""

    seeds: list[tuple[np.ndarray, np.ndarray]]
    x: np.ndarray
    y: np.ndarray
    low: np.ndarray
    high: np.ndarray
    count: int


def _summaries(df: pd.DataFrame, metric: str, unit: str) -> dict[str, _Summary]:
    """Per variant; points line up by ``eval_point`` in suite tables, else by each seed's evaluation order."""
    df = df.dropna(subset=[metric, unit]).sort_values(["variant", "seed", unit])
    aligned = "eval_point" in df.columns and df["eval_point"].notna().all()
    key = df["eval_point"] if aligned else df.groupby(["variant", "seed"]).cumcount()
    df = df.assign(_point=key.to_numpy())
    out = {}
    for variant, group in df.groupby("variant"):
        seeds = [(g[unit].to_numpy(float), g[metric].to_numpy(float)) for _, g in group.groupby("seed")]
        points = group.groupby("_point")
        bands = [_band(g[metric].to_numpy(float)) for _, g in points]
        out[str(variant)] = _Summary(seeds, points[unit].mean().to_numpy(float), points[metric].mean().to_numpy(float),
                                     np.array([b[0] for b in bands]), np.array([b[1] for b in bands]), len(seeds))  # fmt: skip
    return out


def _band(values: np.ndarray) -> tuple[float, float]:
    if len(values) >= BAND_SEEDS:
        interval = mean_interval(values, resamples=PLOT_RESAMPLES)
        assert interval is not None  # ≥ 5 seeds always have one
        return interval.low, interval.high
    return float(values.min()), float(values.max())


def band_label(counts: list[int]) -> str:
    """What the bands are, for the legend."""
    if min(counts) >= BAND_SEEDS:
        return f"bands: 95% bootstrap interval of the mean over {_seeds(counts)} seeds"
    if max(counts) < BAND_SEEDS:
        return f"bands: min–max over {_seeds(counts)} seeds"
    return f"bands: 95% bootstrap interval of the mean (≥ {BAND_SEEDS} seeds), else min–max over seeds"


def _seeds(counts: list[int]) -> str:
    return str(counts[0]) if len(set(counts)) == 1 else f"{min(counts)}–{max(counts)}"


def _draw(axis: Axes, summary: _Summary, style: Style, label: str, per_seed: bool) -> None:
    if per_seed:
        for x, y in summary.seeds:
            axis.plot(x, y, color=style.color, linestyle=style.linestyle, linewidth=0.6, alpha=0.35, zorder=1)
    axis.fill_between(summary.x, summary.low, summary.high, color=style.color, alpha=0.12, linewidth=0, zorder=0)
    axis.plot(summary.x, summary.y, color=style.color, linestyle=style.linestyle, marker=style.marker,
              markersize=4, linewidth=1.6, label=label, zorder=2)  # fmt: skip


def _x_axis(axis: Axes, unit: str, log_x: bool, xs: list[np.ndarray]) -> None:
    axis.set_xlabel(UNIT_LABELS.get(unit, unit) + (" (symmetric log)" if log_x else ""))
    positive = [float(v) for x in xs for v in x if v > 0]
    if log_x and positive:
        axis.set_xscale("symlog", linthresh=min(positive), linscale=0.4)  # x = 0: the untrained model
    else:
        axis.xaxis.set_major_formatter(EngFormatter())  # 40k, 1.2M: compute counts are large
    axis.grid(alpha=0.3, linewidth=0.5)


def efficiency_curve(
    df: pd.DataFrame, metric: str, unit: str, out: Path, *, log_x: bool = False, target: float | None = None
) -> list[Path]:
    """``metric`` against ``unit``: per variant, thin per-seed lines under the seed mean, with a labelled band."""
    _check(df, metric, unit)
    summaries, styles = _summaries(df, metric, unit), variant_styles(df)
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for variant, summary in summaries.items():
        _draw(axis, summary, styles[variant], f"{variant} ({summary.count})", per_seed=True)
    if target is not None:
        axis.axhline(target, color="0.4", linestyle=(0, (2, 2)), linewidth=0.9, label=f"target {target:.3f}")
    _x_axis(axis, unit, log_x, [s.x for s in summaries.values()])
    axis.set_ylabel(metric.removeprefix("eval/"))
    counts = [s.count for s in summaries.values()]
    title = f"variant (seeds); thin lines: seeds\n{band_label(counts)}"
    axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8, title=title,
                title_fontsize=7, alignment="left")  # fmt: skip
    return _save(figure, out)


def per_task_curves(df: pd.DataFrame, metrics: list[str], unit: str, out: Path, *, log_x: bool = False) -> list[Path]:
    """Small multiples: one panel per metric (e.g. per GenEval task), seed means with labelled bands."""
    _check(df, unit, *metrics)
    styles = variant_styles(df)
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 2.6 * rows), squeeze=False)
    counts: list[int] = []
    for axis, metric in zip(axes.flat, metrics, strict=False):
        summaries = _summaries(df, metric, unit)
        for variant, summary in summaries.items():
            _draw(axis, summary, styles[variant], variant, per_seed=False)
        counts = [s.count for s in summaries.values()]
        _x_axis(axis, unit, log_x, [s.x for s in summaries.values()])
        axis.set_title(metric.removeprefix("eval/"), fontsize=9)
        axis.set_xlabel("")
    for axis in list(axes.flat)[len(metrics) :]:
        axis.set_visible(False)
    figure.supxlabel(UNIT_LABELS.get(unit, unit), fontsize=9)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False, fontsize=8,
                  title=band_label(counts), title_fontsize=7)  # fmt: skip
    figure.tight_layout()
    return _save(figure, out)


def _speedup_row(axis: Axes, y: int, row: TargetRow, style: Style, right: float, left: float) -> str:
    """Draw one variant's speedup and interval at height ``y``; returns the text beside it."""
    s = row.speedup
    assert s is not None and s.bound != "?"
    kind = {"=": "", ">=": "≥ ", "<=": "≤ "}[s.bound]
    axis.plot([s.value], [y], marker=style.marker, color=style.color, markersize=6, linestyle="none", zorder=3)
    interval = s.interval
    if interval is None:
        return f"{kind}{s.value:.3g}×, {s.note}"
    low, high = interval.low, interval.high
    arrow = {"arrowstyle": "-|>", "color": style.color, "linewidth": 1.4, "mutation_scale": 10}
    if low > 0 and math.isfinite(high):
        axis.plot([low, high], [y, y], color=style.color, linewidth=1.6, zorder=2)
        return f"{kind}{s.value:.3g}×  [{low:.3g}, {high:.3g}]"
    share = f"{interval.unreached:.0%} of resamples unreached"
    if low > 0:  # no upper end: an arrow to the right edge
        axis.annotate("", xy=(right, y), xytext=(low, y), arrowprops=arrow, zorder=2)
        return f"{kind}{s.value:.3g}×  (interval ≥ {low:.3g}×; {share})"
    if math.isfinite(high):
        axis.annotate("", xy=(left, y), xytext=(high, y), arrowprops=arrow, zorder=2)
        return f"{kind}{s.value:.3g}×  (interval ≤ {high:.3g}×; {share})"
    return f"{kind}{s.value:.3g}×  (no bound; {share})"


def speedup_chart(
    df: pd.DataFrame, rows: list[TargetRow], tau: float, metric: str, unit: str, reference: str, target_text: str,
    out: Path,
) -> list[Path]:  # fmt: skip
    """Speedup over ``reference`` per variant (log x): point, interval bar, arrows for one-sided bounds."""
    styles = variant_styles(df)
    shown = [r for r in rows if r.speedup is not None and r.speedup.bound != "?"]
    missing = [f"{r.variant} ({r.speedup.note})" for r in rows if r.speedup is not None and r.speedup.bound == "?"]
    ends = [v for r in shown for v in _ends(r) if 0 < v < math.inf] or [1.0]
    left, right = min(*ends, 1.0) / 1.6, max(*ends, 1.0) * 1.6
    figure, axis = plt.subplots(figsize=(6.4, 0.45 * max(len(shown), 2) + 1.2))
    axis.set_xscale("log")
    axis.set_xlim(left, right)
    axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    axis.xaxis.set_minor_formatter(NullFormatter())
    labels = []
    for y, row in enumerate(reversed(shown)):
        text = _speedup_row(axis, y, row, styles[row.variant], right, left)
        labels.append(row.variant)
        axis.annotate(text, (1.01, y), xycoords=("axes fraction", "data"), fontsize=7, va="center")
    axis.axvline(1.0, color="0.5", linewidth=0.8, linestyle=(0, (2, 2)))
    axis.set_yticks(range(len(labels)), labels, fontsize=8)
    axis.set_ylim(-0.7, len(labels) - 0.3)
    axis.set_xlabel(f"speedup over {reference}: its compute to target / the variant's ({unit.split('/')[-1]})")
    axis.set_title(f"to reach {metric.removeprefix('eval/')} = {tau:.3f}: {target_text}", fontsize=8)
    axis.grid(axis="x", alpha=0.3, linewidth=0.5, which="both")
    note = "bars: 95% stratified-bootstrap intervals over seeds; arrows: one-sided bounds (the other end unknown)"
    if missing:
        note += "\n" + textwrap.fill("no ratio: " + ", ".join(missing), 110)
    axis.annotate(note, (0, 0), xycoords="axes fraction", xytext=(0, -38), textcoords="offset points", fontsize=7,
                  va="top")  # fmt: skip
    return _save(figure, out)


def _ends(row: TargetRow) -> list[float]:
    s = row.speedup
    assert s is not None
    values = [s.value]
    if s.interval is not None:
        values += [s.interval.low, s.interval.high]
    return values
