"""Figures on synthetic tables: the files, the styles that keep variants apart, the labelled bands."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harness.plots import (
    BAND_SEEDS,
    _summaries,
    band_label,
    efficiency_curve,
    families,
    per_task_curves,
    variant_styles,
)
from harness.statistics import Target
from tests.harness.test_tables import METRIC, UNIT, synthetic

ELEVEN = {  # shapes_full's variants and their registered methods
    "diffusion_nft": "diffusion_nft", "nft_positive_only": "diffusion_nft", "nft_proxy": "diffusion_nft",
    "flow_grpo_cfg4.5": "flow_grpo", "flow_grpo_nocfg": "flow_grpo", "flow_grpo_fast": "flow_grpo_fast",
    "raft": "raft", "rwr": "rwr", "online_dpo": "online_dpo", "awm": "awm", "draft": "draft",
}  # fmt: skip


def test_one_hue_per_family_and_every_variant_apart_in_greyscale():
    assert families(ELEVEN)["flow_grpo_fast"] == "flow_grpo"  # a method that extends another joins its family
    df = pd.DataFrame({"variant": list(ELEVEN), "method": list(ELEVEN.values()), "seed": 0})
    styles = variant_styles(df)
    family = families(ELEVEN)
    for a in ELEVEN:
        for b in ELEVEN:
            same_family = family[a] == family[b]
            assert (styles[a].color == styles[b].color) == same_family
            if a != b and same_family:
                assert styles[a].linestyle != styles[b].linestyle  # apart in greyscale within a family
    assert len({s.marker for s in styles.values()}) == len(ELEVEN)  # and every variant has its own marker
    assert "#F0E442" not in {s.color for s in styles.values()}  # the pale yellow only beyond seven families


def test_bands_are_min_max_below_five_seeds_and_a_bootstrap_interval_from_five():
    df = synthetic()
    summary = _summaries(df, METRIC, UNIT)["fast"]
    np.testing.assert_allclose(summary.low, [0.1, 0.3, 0.5, 0.6, 0.7])  # min over 3 seeds
    np.testing.assert_allclose(summary.high, [0.1, 0.5, 0.6, 0.7, 0.8])
    rng = np.random.default_rng(0)
    eight = pd.DataFrame([{"variant": "v", "seed": s, "eval_point": p, UNIT: 100 * p, METRIC: 0.4 * p + rng.normal(0, 0.05)}
                          for s in range(8) for p in range(3)])  # fmt: skip
    banded = _summaries(eight, METRIC, UNIT)["v"]
    values = eight[eight.eval_point == 1][METRIC]
    assert banded.count > BAND_SEEDS and values.min() < banded.low[1] < values.mean() < banded.high[1] < values.max()
    assert band_label([3, 3]) == "bands: min–max over 3 seeds"
    assert band_label([5, 5]) == "bands: 95% bootstrap interval of the mean over 5 seeds"
    assert "else min–max" in band_label([3, 5])


def test_curves_write_png_and_pdf(tmp_path):
    df = synthetic()
    paths = efficiency_curve(df, METRIC, UNIT, tmp_path / "curve", log_x=True, target=0.4)
    assert [p.name for p in paths] == ["curve.png", "curve.pdf"] and all(p.stat().st_size > 1000 for p in paths)
    assert paths[1].read_bytes().startswith(b"%PDF")
    paths = per_task_curves(df, ["eval/single_object", "eval/counting"], UNIT, tmp_path / "tasks")
    assert all(p.exists() for p in paths)
    with pytest.raises(KeyError, match="lacks columns"):
        efficiency_curve(df, "eval/missing", UNIT, tmp_path / "x")


def test_speedup_chart_draws_one_sided_bounds_as_arrows(tmp_path, monkeypatch):
    import matplotlib.axes

    from harness.plots import speedup_chart
    from harness.tables import target_rows

    arrows = []
    original = matplotlib.axes.Axes.annotate

    def counting(self, text, *args, **kwargs):
        if kwargs.get("arrowprops"):
            arrows.append(text)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", counting)
    target = Target("reference_final", 1.0)  # two of three reference seeds fall short: one-sided bounds
    tau, rows = target_rows(synthetic(), METRIC, UNIT, target, "slow", resamples=500)
    paths = speedup_chart(synthetic(), rows, tau, METRIC, UNIT, "slow", target.describe("slow"), tmp_path / "s")
    assert paths[0].stat().st_size > 1000 and len(arrows) == 1  # fast: ≥ (few and stuck never reach it)
