"""``diffrl report DIR``: a suite folder's README with its curves, tables, samples, config and provenance.

Everything is read from the files ``diffrl run`` wrote (``suite.yaml``, ``results.parquet``,
``metadata.json``, ``timing.json``, ``samples/``), so a report can be rebuilt at any time
without recomputing anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from harness.atomic import atomic_write, atomic_write_text  # noqa: E402
from harness.budget import UNIT_COLUMNS  # noqa: E402
from harness.plots import efficiency_curve, per_task_curves  # noqa: E402
from harness.store import read_results  # noqa: E402
from harness.tables import (  # noqa: E402
    final_scores,
    final_scores_markdown,
    speedup_latex,
    speedup_markdown,
    speedups,
)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_tables(df: pd.DataFrame, out: Path, metric: str, unit: str, reference: str | None,
                 target: float | None) -> tuple[str, str | None, float | None]:  # fmt: skip
    """``table.md`` / ``table.tex``: final scores (every metric) and compute-to-target; returns the Markdown parts."""
    metrics = [c for c in df.columns if c.startswith("eval/")]
    scores = final_scores(df, metrics, unit)
    final_md = final_scores_markdown(scores, metrics)
    target_md = target_tex = None
    if reference is not None and reference in scores.index:
        if target is None:
            target = float(scores.loc[reference, f"{metric}/mean"])
        rows = speedups(df, metric, unit, target, reference)
        target_md, target_tex = (
            speedup_markdown(rows, unit, target, reference),
            speedup_latex(rows, unit, target, reference),
        )
    atomic_write_text(out / "table.md", final_md + ("\n" + target_md if target_md else ""))
    tex = scores[[f"{m}/{s}" for m in metrics for s in ("mean", "std")]].to_latex(float_format="%.3f")
    atomic_write_text(out / "table.tex", tex + ("\n" + target_tex if target_tex else ""))
    return final_md, target_md, target


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
    report = config["report"]
    metric = f"eval/{report['metric']}"
    unit = UNIT_COLUMNS[report["unit"] or config["budget"]["unit"]]
    short_unit = unit.split("/")[-1]
    curve = efficiency_curve(df, metric, unit, out / f"{report['metric']}_vs_{short_unit}", log_x=report["log_x"])[0]
    others = [c for c in df.columns if c.startswith("eval/") and c != metric]
    tasks = (
        per_task_curves(df, others, unit, out / f"metrics_vs_{short_unit}", log_x=report["log_x"])[0]
        if others
        else None
    )
    final_md, target_md, target = write_tables(df, out, metric, unit, report["reference"], report["target"])
    samples = sample_figure(out, config, df)

    budget = config["budget"]
    lines = [f"# Suite `{config['name']}`", ""]
    if config.get("description"):
        lines += [config["description"].strip(), ""]
    lines += [
        f"Made by `{command or 'diffrl run ' + metadata.get('source', config['name'])}`; rebuild this page with "
        f"`diffrl report {out}`. Budget: {budget['amount']:,g} {budget['unit']} per run, evaluated at "
        f"{', '.join(f'{f:.0%}' for f in budget['eval_at'])} of it; seeds {config['seeds']}.",
        "",
        f"![{report['metric']} against {short_unit}]({curve.name})",
        "",
        "## Final scores (mean ± sample std over seeds, at each run's last evaluation)",
        "",
        final_md,
    ]
    if target_md:
        lines += [f"## Compute to reach {report['metric']} = {target:.3f} (`{unit}`)", "", target_md]
        lines += [
            "Compute to target: the mean compute of the seeds at the first eval point where the mean over seeds "
            "reaches the target (\"not reached\": never). Speedup: the reference's compute over the variant's, "
            "with a 95% bootstrap CI over seeds (∞: in some resamples the reference never reaches it).",
            "",
        ]
    if tasks is not None:
        lines += ["## Every metric", "", f"![metrics against {short_unit}]({tasks.name})", ""]
    if samples is not None:
        lines += [
            "## Samples",
            "",
            f"Seed {config['seeds'][0]}; per panel, one column per task: the first images of its first eval prompts.",
            "",
            f"![samples]({samples.name})",
            "",
        ]
    failed = [c for c in metadata.get("cells", []) if c["status"] != "done"]
    if failed:
        lines += ["## Failed cells", ""] + [f"- {c['variant']} seed {c['seed']}: {c['error']}" for c in failed] + [""]
    lines += _provenance(metadata, timing)
    lines += ["## Resolved suite config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return atomic_write_text(out / "README.md", "\n".join(lines))


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
            f"- wall time of the last `diffrl run`: {timing['wall_seconds']:.0f} s = methods' sampling, reward and "
            f"training {method:.0f} s + evaluation {timing['eval_seconds']:.0f} s + harness "
            f"{timing['harness_seconds']:.0f} s ({timing['harness_fraction']:.1%})"
        )
    return [*lines, ""]
