"""``diffrl report DIR``: a suite folder's README with its curves, tables, samples, config and provenance.

Everything is read from the files ``diffrl run`` wrote (``suite.yaml``, ``results.parquet``,
``eval_prompts.parquet``, ``metadata.json``, ``timing.json``, ``samples/``), so a report can be
rebuilt at any time without recomputing anything. Every table and figure is the output of one
``diffrl table`` or ``diffrl plot`` command, printed beside it (:class:`Comparison` builds both).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from harness.atomic import atomic_write, atomic_write_text  # noqa: E402
from harness.budget import UNIT_COLUMNS, eval_fractions  # noqa: E402
from harness.evaluate import EvalNoise  # noqa: E402
from harness.plots import efficiency_curve, per_task_curves, speedup_chart  # noqa: E402
from harness.statistics import DEFAULT_GAIN, RESAMPLES, Target  # noqa: E402
from harness.store import read_results  # noqa: E402
from harness.tables import (  # noqa: E402
    Table,
    TargetRow,
    aggregate_table,
    final_scores,
    final_scores_table,
    matched_table,
    target_rows,
    target_table,
    task_metrics,
)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass(frozen=True)
class Comparison:
    """What ``diffrl table``, ``diffrl plot`` and ``diffrl report`` compare, and the flags that say it."""

    metric: str = "eval/overall"
    unit: str = "compute/fwd_equiv"
    reference: str | None = None
    target: Target = field(default_factory=Target)
    resamples: int = RESAMPLES
    seed: int = 0

    def flags(self) -> str:
        """The command-line flags that reproduce this comparison."""
        flags = f"--metric {self.metric} --unit {self.unit}"
        if self.reference is not None:
            flags += (
                f" --reference {self.reference} "
                + {
                    "absolute": f"--target {self.target.value:g}",
                    "reference_final": "--target-final",
                    "reference_gain": f"--target-gain {self.target.value:g}",
                }[self.target.kind]
            )
        if self.resamples != RESAMPLES or self.seed:
            flags += f" --resamples {self.resamples} --seed {self.seed}"
        return flags


@dataclass(frozen=True)
class Results:
    """A comparison's tables, and the target and rows that its speedup chart draws."""

    tables: dict[str, Table]
    tau: float | None = None
    rows: list[TargetRow] = field(default_factory=list)


def compare(df: pd.DataFrame, noise: EvalNoise, c: Comparison, *, matched: bool = True) -> Results:
    """Final scores (every metric), aggregates, and with a reference: compute-to-target and matched compute."""
    metrics = [col for col in df.columns if col.startswith("eval/")]
    scores = final_scores(df, metrics, c.unit, noise, resamples=c.resamples, seed=c.seed)
    tables = {"final": final_scores_table(scores, metrics, noise)}
    tau: float | None = None
    rows: list[TargetRow] = []
    if c.reference is not None:
        tau, rows = target_rows(df, c.metric, c.unit, c.target, c.reference, resamples=c.resamples, seed=c.seed)
        se = float(scores.loc[c.reference, f"{c.metric}/eval_se"])
        tables["target"] = target_table(tau, rows, c.metric, c.unit, c.target, c.reference, se)
    tables["aggregates"] = aggregate_table(df, task_metrics(df, c.metric), c.unit, c.reference,
                                           resamples=c.resamples, seed=c.seed)  # fmt: skip
    has_points = "eval_point" in df.columns and df["eval_point"].notna().any()
    if matched and c.reference is not None and has_points:
        tables["matched"] = matched_table(df, c.metric, c.unit, c.reference, noise, resamples=c.resamples,
                                          seed=c.seed)  # fmt: skip
    return Results(tables, tau, rows)


def report_comparison(config: dict[str, Any]) -> Comparison:
    """The comparison a suite's ``report`` section asks for (target: ``report.target``, else ``target_gain``)."""
    report = config["report"]
    unit = UNIT_COLUMNS[report["unit"] or config["budget"]["unit"]]
    if report.get("target") is not None:
        target = Target("absolute", float(report["target"]))
    else:
        target = Target("reference_gain", float(report.get("target_gain", DEFAULT_GAIN)))
    return Comparison(f"eval/{report['metric']}", unit, report["reference"], target)


def _figures(df: pd.DataFrame, out: Path, c: Comparison, result: Results, log_x: bool) -> dict[str, Path]:
    name, short_unit = c.metric.removeprefix("eval/"), c.unit.split("/")[-1]
    figures = {"curve": efficiency_curve(df, c.metric, c.unit, out / f"{name}_vs_{short_unit}", log_x=log_x,
                                         target=result.tau)[0]}  # fmt: skip
    others = [col for col in df.columns if col.startswith("eval/") and col != c.metric]
    if others:
        figures["tasks"] = per_task_curves(df, others, c.unit, out / f"metrics_vs_{short_unit}", log_x=log_x)[0]
    if c.reference is not None and result.tau is not None:
        figures["speedup"] = speedup_chart(df, result.rows, result.tau, c.metric, c.unit, c.reference,
                                           c.target.describe(c.reference), out / f"speedup_{name}_{short_unit}")[0]  # fmt: skip
    return figures


def _write_tables(out: Path, tables: dict[str, Table]) -> None:
    atomic_write_text(out / "table.md", "\n".join(t.markdown() for t in tables.values()))
    atomic_write_text(out / "table.tex", "\n".join(t.latex() for t in tables.values()))


def sample_figure(out: Path, config: dict[str, Any], df: pd.DataFrame, columns: int = 3) -> Path | None:
    """Rows: variants (first seed); columns: the untrained model and ``columns`` eval points up to the end."""
    samples = out / "samples"
    seed = config["seeds"][0]
    points = sorted(int(p) for p in df["eval_point"].dropna().unique() if p > 0) if "eval_point" in df else []
    if not points:
        return None
    chosen = sorted({points[round(i * (len(points) - 1) / max(1, columns - 1))] for i in range(columns)})
    fractions = dict(zip(df["eval_point"], df["budget/fraction"], strict=False))
    rows = []
    for entry in config["methods"]:
        paths = [samples / f"base_cfg{entry['eval_cfg']:g}.png"]
        paths += [samples / f"{entry['label']}_seed{seed}_point{p}.png" for p in chosen]
        rows.append((entry["label"], paths))
    if not all(path.is_file() for _, paths in rows for path in paths):
        return None
    titles = ["untrained", *(f"{fractions.get(p, 0):.0%} of budget" for p in chosen)]
    width, height = Image.open(rows[0][1][0]).size
    panel = 3.2  # inches per panel, its height following the grid's aspect ratio
    figure, axes = plt.subplots(
        len(rows),
        len(titles),
        figsize=(panel * len(titles), (panel * height / width + 0.35) * len(rows)),
        squeeze=False,
    )
    for r, (label, paths) in enumerate(rows):
        for c, path in enumerate(paths):
            axis = axes[r][c]
            axis.imshow(Image.open(path))
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(titles[c], fontsize=9)
            if c == 0:
                axis.set_ylabel(label, fontsize=9)
    target = atomic_write(out / "samples.png", lambda f: figure.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(figure)
    return target


def write_report(out: Path, command: str | None = None) -> Path:
    """Rebuild ``out/README.md`` (and its plots and tables) from a suite folder."""
    config = yaml.safe_load((out / "suite.yaml").read_text())
    metadata, timing = _read_json(out / "metadata.json"), _read_json(out / "timing.json")
    df = read_results(out)
    c = report_comparison(config)
    log_x = bool(config["report"]["log_x"])
    result = compare(df, EvalNoise.load(out), c)
    figures = _figures(df, out, c, result, log_x)
    _write_tables(out, result.tables)
    lines = _head(out, config, metadata, command)
    lines += _sections(out, c, result, figures, log_x)
    samples = sample_figure(out, config, df)
    if samples is not None:
        lines += [
            "## Samples",
            "",
            f"Seed {config['seeds'][0]}; per panel, one column per task: the first images of its first eval prompts.",
            "",
            f"![samples]({samples.name})",
            "",
        ]
    failed = [cell for cell in metadata.get("cells", []) if cell["status"] != "done"]
    if failed:
        lines += ["## Failed cells", ""] + [f"- {f['variant']} seed {f['seed']}: {f['error']}" for f in failed] + [""]
    lines += _provenance(metadata, timing)
    lines += ["## Resolved suite config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return atomic_write_text(out / "README.md", "\n".join(lines))


def _head(out: Path, config: dict[str, Any], metadata: dict[str, Any], command: str | None) -> list[str]:
    budget = config["budget"]
    fractions = ", ".join(f"{100 * f:.3g}%" for f in eval_fractions(budget["eval_at"]))
    lines = [f"# Suite `{config['name']}`", ""]
    if config.get("description"):
        lines += [config["description"].strip(), ""]
    lines += [
        f"Made by `{command or 'diffrl run ' + metadata.get('source', config['name'])}`; rebuild this page with "
        f"`diffrl report {out}`. Budget: {budget['amount']:,g} {budget['unit']} per run, evaluated before training "
        f"and at {fractions} of it; seeds {config['seeds']}. How every number is computed: docs/statistics.md.",
        "",
    ]
    return lines


def _sections(out: Path, c: Comparison, result: Results, figures: dict[str, Path], log_x: bool) -> list[str]:
    """The figures and tables, each with the one command that reproduces it."""
    plot = f"diffrl plot {out} {c.flags()}" + (" --log-x" if log_x else "")
    table = f"diffrl table {out} {c.flags()}"
    name = c.metric.removeprefix("eval/")
    tables = result.tables
    lines = [f"![{name} against {c.unit}]({figures['curve'].name})", "", f"Figure: `{plot}`", ""]
    lines += ["## Final scores", "", tables["final"].markdown(), f"Table: `{table}`", ""]
    if "target" in tables:
        lines += [f"## Compute to reach {name} = {result.tau:.3f}", "", tables["target"].markdown()]
        lines += [f"Table: `{table}`", ""]
        if "speedup" in figures:
            lines += [f"![speedups]({figures['speedup'].name})", "", f"Figure: `{plot} --kind speedup`", ""]
    lines += ["## Aggregates over seeds × tasks", "", tables["aggregates"].markdown(), f"Table: `{table}`", ""]
    if "matched" in tables:
        lines += [f"## {name} at matched compute", "", tables["matched"].markdown()]
        lines += [f"Table: `{table} --matched`", ""]
    if "tasks" in figures:
        lines += ["## Every metric", "", f"![metrics against {c.unit}]({figures['tasks'].name})", ""]
        lines += [f"Figure: `{plot} --kind tasks`", ""]
    return lines


def _provenance(metadata: dict[str, Any], timing: dict[str, Any]) -> list[str]:
    git, device = metadata.get("git", {}), metadata.get("device", {})
    commit = git.get("commit") or "unknown"
    lines = [
        "## Provenance",
        "",
        f"- commit `{commit[:12]}`{' (with uncommitted changes)' if git.get('dirty') else ''}, "
        f"config hash `{metadata.get('config_hash', '')[:12]}`, finished {metadata.get('finished', '?')}",
        f"- device: {device.get('cuda') or device.get('cpu')}, {device.get('torch_threads')} torch threads, "
        f"Python {device.get('python')}",
        "- packages: " + ", ".join(f"{k} {v}" for k, v in metadata.get("packages", {}).items() if v),
    ]
    if timing:
        method = sum(timing["method_seconds"].values())
        lines.append(
            f"- wall time of the whole run ({len(timing.get('invocations', [])) or 1} invocation(s) of `diffrl run`): "
            f"{timing['wall_seconds']:.0f} s = methods' sampling, reward and "
            f"training {method:.0f} s + evaluation {timing['eval_seconds']:.0f} s + harness "
            f"{timing['harness_seconds']:.0f} s ({timing['harness_fraction']:.1%})"
        )
    return [*lines, ""]
