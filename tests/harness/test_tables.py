"""Tables on a synthetic results table whose answers are known."""

import pandas as pd
import pytest

from harness.tables import (
    NOT_REACHED,
    compute_to_target,
    final_scores,
    final_scores_markdown,
    mean_curve_to_target,
    speedup_latex,
    speedup_markdown,
    speedups,
)


def synthetic() -> pd.DataFrame:
    """fast reaches 0.5 at 100 (seed 0) and 200 (seed 1); slow at 400 and 400; stuck never."""
    rows = []
    curves = {
        ("fast", 0): [0.1, 0.5, 0.6, 0.7, 0.8],
        ("fast", 1): [0.1, 0.3, 0.5, 0.6, 0.7],
        ("slow", 0): [0.1, 0.2, 0.3, 0.4, 0.5],
        ("slow", 1): [0.1, 0.2, 0.3, 0.45, 0.55],
        ("stuck", 0): [0.1, 0.1, 0.1, 0.1, 0.1],
        ("stuck", 1): [0.1, 0.2, 0.6, 0.6, 0.6],
    }
    for (variant, seed), values in curves.items():
        for step, value in enumerate(values):
            rows.append({"variant": variant, "seed": seed, "compute/fwd_equiv": 100 * step, "eval/overall": value})
    return pd.DataFrame(rows)


def test_compute_to_target_first_crossing():
    per_seed = compute_to_target(synthetic(), "eval/overall", "compute/fwd_equiv", 0.5)
    assert per_seed[("fast", 0)] == 100 and per_seed[("fast", 1)] == 200
    assert per_seed[("slow", 0)] == 400 and per_seed[("slow", 1)] == 400
    assert pd.isna(per_seed[("stuck", 0)]) and per_seed[("stuck", 1)] == 200


def test_speedup_and_bootstrap_ci():
    rows = {r.variant: r for r in speedups(synthetic(), "eval/overall", "compute/fwd_equiv", 0.5, reference="slow")}
    assert rows["fast"].mean == 150 and rows["fast"].speedup == pytest.approx(400 / 150)
    low, high = rows["fast"].ci
    # Seeds resampled: fast's mean is 100, 150 or 200; slow's is always 400 → ratios in [2, 4].
    assert 2.0 <= low <= 400 / 150 <= high <= 4.0
    assert rows["slow"].speedup == 1.0 and rows["slow"].ci == (1.0, 1.0)
    assert rows["stuck"].mean is None  # one seed never reaches it: no number
    markdown = speedup_markdown(list(rows.values()), "compute/fwd_equiv", 0.5, "slow")
    assert f"| stuck | {NOT_REACHED} |" in markdown and "2.67×" in markdown
    assert "not reached" in speedup_latex(list(rows.values()), "compute/fwd_equiv", 0.5, "slow")
    with pytest.raises(KeyError, match="reference variant 'nope'"):
        speedups(synthetic(), "eval/overall", "compute/fwd_equiv", 0.5, reference="nope")


def test_final_scores_mean_std_and_bold_best():
    scores = final_scores(synthetic(), ["eval/overall"])
    assert scores.loc["fast", "eval/overall/mean"] == pytest.approx(0.75)
    assert scores.loc["fast", "eval/overall/std"] == pytest.approx(0.05 * 2**0.5)  # sample std of 0.8, 0.7
    assert scores.loc["slow", "seeds"] == 2
    table = final_scores_markdown(scores, ["eval/overall"])
    assert "| fast | 2 | **0.750 ± 0.071** |" in table
    with pytest.raises(KeyError, match="lacks columns"):
        final_scores(synthetic(), ["eval/missing"])


def test_cli_table_and_plot(tmp_path, capsys):
    from harness.cli import main

    path = tmp_path / "results.csv"
    synthetic().to_csv(path, index=False)
    assert main(["table", str(path), "--target", "0.5", "--reference", "slow"]) == 0
    out = capsys.readouterr().out
    assert "| fast | 2 | **0.750 ± 0.071** |" in out and "| stuck | not reached | – | – |" in out
    assert main(["table", str(path), "--target-variant", "slow", "--reference", "slow", "--latex"]) == 0
    assert "\\begin{tabular}" in capsys.readouterr().out
    assert main(["plot", str(path), "--log-x"]) == 0
    assert (tmp_path / "overall_vs_fwd_equiv.png").exists() and (tmp_path / "overall_vs_fwd_equiv.pdf").exists()
    with pytest.raises(SystemExit, match="not found"):
        main(["plot", str(tmp_path / "missing.csv")])


def with_eval_points(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(eval_point=df["compute/fwd_equiv"] // 100)


def test_mean_curve_compute_to_target_uses_the_seed_mean_curve():
    df = with_eval_points(synthetic())
    crossing = mean_curve_to_target(df, "eval/overall", "compute/fwd_equiv", 0.5)
    # Seed means: fast 0.1 0.4 0.55 …→ 200; slow 0.1 0.2 0.3 0.425 0.525 → 400; stuck 0.1 0.15 0.35 … never.
    assert crossing["fast"] == 200 and crossing["slow"] == 400 and pd.isna(crossing["stuck"])
    rows = {r.variant: r for r in speedups(df, "eval/overall", "compute/fwd_equiv", 0.5, reference="slow")}
    assert rows["fast"].mean == 200 and rows["fast"].speedup == 2.0 and rows["stuck"].mean is None
    # Resampled seeds: fast's mean curve reaches 0.5 at 100 (seed 0 twice) or 200; slow's always at 400.
    assert rows["fast"].ci[0] >= 2.0 and rows["fast"].ci[1] <= 4.0
    assert rows["slow"].speedup == 1.0
    per_seed = {r.variant: r for r in speedups(df, "eval/overall", "compute/fwd_equiv", 0.5, "slow", mode="per_seed")}
    assert per_seed["fast"].mean == 150


def test_mean_curve_counts_an_unreached_resample_as_infinite_compute():
    df = with_eval_points(synthetic())
    # 0.52: slow's seed-mean curve reaches it at 400 (0.525), but seed 0 alone (0.5) never does.
    rows = {r.variant: r for r in speedups(df, "eval/overall", "compute/fwd_equiv", 0.52, reference="slow")}
    assert rows["slow"].ci[1] == float("inf") and rows["fast"].ci[1] == float("inf")
    assert ", ∞] |" in speedup_markdown(list(rows.values()), "compute/fwd_equiv", 0.52, "slow")
