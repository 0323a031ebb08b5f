"""Plots on a synthetic table write the expected files."""

import pytest

from harness.plots import efficiency_curve, per_task_curves
from tests.harness.test_tables import synthetic


def test_curves_write_png_and_pdf(tmp_path):
    df = synthetic()
    df["eval/counting"] = df["eval/overall"] / 2
    paths = efficiency_curve(df, "eval/overall", "compute/fwd_equiv", tmp_path / "curve", log_x=True)
    assert [p.name for p in paths] == ["curve.png", "curve.pdf"] and all(p.stat().st_size > 1000 for p in paths)
    paths = per_task_curves(df, ["eval/overall", "eval/counting"], "compute/fwd_equiv", tmp_path / "tasks")
    assert all(p.exists() for p in paths)
    with pytest.raises(KeyError, match="lacks columns"):
        efficiency_curve(df, "eval/missing", "compute/fwd_equiv", tmp_path / "x")
