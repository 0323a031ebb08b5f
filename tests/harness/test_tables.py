"""Tables on synthetic results tables whose answers are known, and the `diffrl table` / `diffrl plot` flags."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.cli import main
from harness.evaluate import EvalNoise, prompt_scores_frame
from harness.statistics import Target, eval_standard_error, paired_difference
from harness.tables import (
    NOT_REACHED,
    aggregate_table,
    compute_to_target,
    final_scores,
    final_scores_table,
    matched_table,
    target_rows,
    target_table,
    task_metrics,
)

CURVES = {  # evaluated at compute 0, 100, 200, 300, 400 (eval points 0..4; 0: the untrained model)
    ("slow", 0): [0.1, 0.2, 0.3, 0.4, 0.5],
    ("slow", 1): [0.1, 0.2, 0.3, 0.45, 0.55],
    ("slow", 2): [0.1, 0.15, 0.3, 0.4, 0.5],
    ("fast", 0): [0.1, 0.5, 0.6, 0.7, 0.8],
    ("fast", 1): [0.1, 0.3, 0.5, 0.6, 0.7],
    ("fast", 2): [0.1, 0.4, 0.6, 0.7, 0.75],
    ("stuck", 0): [0.1, 0.1, 0.1, 0.1, 0.1],
    ("stuck", 1): [0.1, 0.1, 0.2, 0.2, 0.2],
    ("stuck", 2): [0.1, 0.1, 0.1, 0.2, 0.2],
    ("few", 0): [0.1, 0.45, 0.5, 0.5, 0.5],
    ("few", 1): [0.1, 0.35, 0.5, 0.5, 0.5],
}
UNIT, METRIC = "compute/fwd_equiv", "eval/overall"


def synthetic() -> pd.DataFrame:
    """Per-task columns: single_object = overall + 0.1, counting = overall − 0.1 (overall is their mean)."""
    rows = []
    for (variant, seed), values in CURVES.items():
        for point, value in enumerate(values):
            rows.append({"variant": variant, "method": variant.split("_")[0], "seed": seed, "iteration": 5 * point,
                         "eval_point": point, UNIT: 100 * point, METRIC: value, "eval/single_object": value + 0.1,
                         "eval/counting": value - 0.1})  # fmt: skip
    return pd.DataFrame(rows)


def test_compute_to_target_interpolates_per_seed():
    per_seed = compute_to_target(synthetic(), METRIC, UNIT, 0.4)
    # slow seed 1 crosses 0.4 two thirds of the way from 200 (0.3) to 300 (0.45); fast seed 0 at 3/4 of 0 → 100.
    np.testing.assert_allclose(per_seed["slow"].to_numpy(), [300, 200 + 200 / 3, 300])
    np.testing.assert_allclose(per_seed["fast"].to_numpy(), [75, 150, 100])
    assert per_seed["stuck"].isna().all()


def rows_by_variant(target: Target, reference: str = "slow") -> tuple[float, dict]:
    tau, rows = target_rows(synthetic(), METRIC, UNIT, target, reference, resamples=1000)
    return tau, {r.variant: r for r in rows}


def test_absolute_target_speedup_is_the_ratio_of_seed_means():
    tau, rows = rows_by_variant(Target("absolute", 0.4))
    assert tau == 0.4
    assert rows["slow"].to_target.mean == pytest.approx((300 + 200 + 200 / 3 + 300) / 3)
    assert rows["fast"].to_target.mean == pytest.approx(325 / 3)
    assert rows["fast"].speedup.value == pytest.approx(rows["slow"].to_target.mean / (325 / 3))
    assert rows["fast"].speedup.bound == "=" and rows["slow"].speedup is None  # the reference itself
    assert rows["stuck"].to_target.reached == 0 and rows["stuck"].speedup.bound == "<="  # slower than slow
    assert rows["few"].speedup.interval is None and rows["few"].speedup.note == "no interval: 2 seeds (< 3)"


def test_reference_gain_target_is_a_fraction_of_the_reference_s_gain():
    tau, rows = rows_by_variant(Target("reference_gain", 0.8))
    final = (0.5 + 0.55 + 0.5) / 3
    assert tau == pytest.approx(0.1 + 0.8 * (final - 0.1))
    assert rows["slow"].to_target.complete and rows["fast"].speedup.interval is not None


def test_reference_final_target_leaves_half_the_reference_short_of_it():
    tau, rows = rows_by_variant(Target("reference_final", 1.0))
    assert tau == pytest.approx((0.5 + 0.55 + 0.5) / 3)
    slow = rows["slow"].to_target
    # Seed 1 crosses it 2/3 of the way from 300 (0.45) to 400 (0.55); the others count at 400, their last point.
    assert (slow.reached, slow.seeds) == (1, 3) and slow.mean == pytest.approx((400 + 300 + 200 / 3 + 400) / 3)
    assert rows["fast"].speedup.bound == ">="


def test_target_table_states_seeds_and_eval_error_and_never_prints_infinity():
    target = Target("reference_final", 1.0)
    tau, rows = target_rows(synthetic(), METRIC, UNIT, target, "slow", resamples=1000)
    table = target_table(tau, rows, METRIC, UNIT, target, "slow", eval_se=0.021)
    text = table.markdown() + table.latex()
    assert "∞" not in text and "inf" not in text
    assert "eval SE of overall about ±0.021" in text
    assert "| slow | 1/3 | ≥ " in text and "| 1 (reference) | – |" in text
    assert f"| stuck | 0/3 | {NOT_REACHED} |" in text
    fast = next(r for r in table.rows if r[0] == "fast")
    assert fast[3].startswith("≥ ") and "of resamples unreached)" in fast[4] and fast[4].startswith("≥ ")
    assert next(r for r in table.rows if r[0] == "few")[2:] == [NOT_REACHED, "–", "not reached"]
    tau, rows = target_rows(synthetic(), METRIC, UNIT, Target("absolute", 0.4), "slow", resamples=1000)
    few = next(r for r in target_table(tau, rows, METRIC, UNIT, target, "slow", math.nan).rows if r[0] == "few")
    assert few[1] == "2/2" and few[4] == "no interval: 2 seeds (< 3)"
    assert r"\begin{tabular}" in table.latex() and r"$\geq$" in table.latex()


def prompt_frame(df: pd.DataFrame, n_per_task: int = 4) -> pd.DataFrame:
    """Per-prompt scores that add up to each row's metrics: two tasks, prompts scored ±0.05 around the task mean."""
    records = []
    offsets = np.tile([-0.05, 0.05], n_per_task // 2)
    for row in df.to_dict("records"):
        single, counting = row["eval/single_object"], row["eval/counting"]
        scores = {"single_object": [*(single + offsets), *[None] * n_per_task],
                  "counting": [*[None] * n_per_task, *(counting + offsets)],
                  "overall": [*(single + offsets), *(counting + offsets)]}  # fmt: skip
        tags = ["single_object"] * n_per_task + ["counting"] * n_per_task
        records.append({key: row[key] for key in ("variant", "seed", "iteration", "eval_point")}
                       | {"tags": tags, "scores": scores})  # fmt: skip
    return prompt_scores_frame(records)


def test_final_scores_carry_a_seed_interval_and_the_eval_error():
    df = synthetic()
    metrics = [METRIC, "eval/counting"]
    noise = EvalNoise(prompt_frame(df))
    scores = final_scores(df, metrics, UNIT, noise, resamples=1000)
    assert scores.loc["fast", f"{METRIC}/mean"] == pytest.approx(0.75)
    assert scores.loc["fast", f"{METRIC}/low"] <= 0.75 <= scores.loc["fast", f"{METRIC}/high"]
    assert math.isnan(scores.loc["few", f"{METRIC}/low"])  # 2 seeds: no interval
    # The eval SE of the seed mean: a bootstrap over prompts of the seed-mean per-prompt scores.
    tags = ["single_object"] * 4 + ["counting"] * 4
    expected = eval_standard_error(
        np.array([0.85 + d for d in (-0.05, 0.05) * 2] + [0.65 + d for d in (-0.05, 0.05) * 2]), tags
    )
    assert scores.loc["fast", f"{METRIC}/eval_se"] == pytest.approx(expected)
    assert scores.loc["fast", f"{METRIC}/se_source"] == "prompts"
    table = final_scores_table(scores, metrics, noise).markdown()
    assert "Seeds per variant: " in table and "bootstrap over the 8 eval prompts" in table
    assert "| few | 2 | 0.500 ±" in table and "No interval for variants with < 3 seeds (few)" in table
    fast = next(line for line in table.splitlines() if line.startswith("| fast |"))
    assert "**0.750 [" in fast and "] ±0.0" in fast


def test_without_per_prompt_scores_the_eval_error_is_the_labelled_binomial_one():
    df = synthetic()
    noise = EvalNoise(None, {"single_object": 64, "counting": 64})
    scores = final_scores(df, [METRIC, "eval/counting"], UNIT, noise, resamples=1000)
    p_single, p_count = 0.85, 0.65
    assert scores.loc["fast", "eval/counting/eval_se"] == pytest.approx(math.sqrt(p_count * (1 - p_count) / 64))
    overall = math.sqrt(p_single * (1 - p_single) / 64 + p_count * (1 - p_count) / 64) / 2
    assert scores.loc["fast", f"{METRIC}/eval_se"] == pytest.approx(overall)
    table = final_scores_table(scores, [METRIC, "eval/counting"], noise).markdown()
    assert "†" in table and "analytic binomial error" in table and "per-prompt scores were not stored" in table
    # Per-prompt scores that do not add up to the stored score are not used.
    bad = prompt_frame(df).assign(**{METRIC: 0.0})
    assert EvalNoise(bad, {"single_object": 64, "counting": 64}).standard_error(df.tail(1), METRIC)[1] == "binomial"


def test_matched_compute_differences_are_paired_by_prompt():
    df = synthetic()
    frame = prompt_frame(df)
    table = matched_table(df, METRIC, UNIT, "slow", EvalNoise(frame), resamples=1000)
    fast_1 = next(r for r in table.rows if r[:2] == ["fast", "1"])
    assert fast_1[2] == "100" and fast_1[4] == "0.400" and fast_1[5] == "+0.217"  # 0.4 − 0.1833
    assert fast_1[6].startswith("[") and fast_1[7].startswith("±")
    ours = frame.query("variant == 'fast' and eval_point == 1").pivot(index="seed", columns="prompt", values=METRIC)
    theirs = frame.query("variant == 'slow' and eval_point == 1").pivot(index="seed", columns="prompt", values=METRIC)
    tags = list(frame.query("variant == 'fast' and seed == 0 and eval_point == 1")["tag"])
    assert fast_1[7] == f"±{paired_difference(ours.to_numpy(), theirs.to_numpy(), tags)[1]:.3f}"
    assert next(r for r in table.rows if r[:2] == ["few", "2"])[6] == "no interval: 2 seeds (< 3)"
    assert "paired prompt by prompt" in table.caption


def test_aggregates_iqm_and_probability_of_improvement():
    df = synthetic()
    tasks = task_metrics(df, METRIC)
    assert tasks == ["eval/single_object", "eval/counting"]
    table = aggregate_table(df, tasks, UNIT, "slow", resamples=500)
    fast = next(r for r in table.rows if r[0] == "fast")
    assert fast[2] == "0.750" and fast[4] == "1.00"  # every fast seed beats every slow seed on both tasks
    assert next(r for r in table.rows if r[0] == "stuck")[4] == "0.00"
    assert "interquartile mean" in table.caption


@pytest.fixture
def results_csv(tmp_path: Path) -> Path:
    path = tmp_path / "results.csv"
    synthetic().to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--target-gain", "0.8"], "80% of slow's final seed-mean gain"),
        ([], "80% of slow's final seed-mean gain"),  # the default target
        (["--target-final"], "slow's final seed-mean score"),
        (["--target", "0.4"], "an absolute score of 0.4"),
        (["--target-variant", "fast"], "an absolute score of 0.75"),
    ],
)
def test_cli_table_target_kinds(results_csv, capsys, flags, expected):
    assert main(["table", str(results_csv), "--reference", "slow", "--resamples", "500", *flags]) == 0
    out = capsys.readouterr().out
    assert expected in out and "∞" not in out and "| variant | seeds |" in out and "Seeds per variant" in out


def test_cli_table_matched_latex_and_bad_flags(results_csv, capsys):
    assert main(["table", str(results_csv), "--reference", "slow", "--matched", "--latex", "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert out.count(r"\begin{tabular}") == 4
    assert main(["table", str(results_csv)]) == 0  # no reference: final scores and IQM only
    assert "P(>" not in capsys.readouterr().out
    for flags, message in [
        (["--target-gain", "1.5", "--reference", "slow"], "--target-gain must be a fraction in (0, 1]"),
        (["--target", "0.4"], "--target needs --reference VARIANT"),
        (["--reference", "nope"], "--reference 'nope' is not in the table; variants: fast, few, slow, stuck"),
        (["--metric", "eval/nope"], "the table has no column 'eval/nope'"),
        (["--matched"], "--matched needs --reference VARIANT"),
    ]:
        assert main(["table", str(results_csv), *flags]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one target kind at a time
        main(["table", str(results_csv), "--target", "0.4", "--target-final", "--reference", "slow"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("target", [[], ["--target-final"], ["--target", "0.4"], ["--target-gain", "0.5"]])
def test_cli_plot_speedups_for_each_target_kind(results_csv, target):
    out = results_csv.parent / "speedup"
    assert main(["plot", str(results_csv), "--kind", "speedup", "--reference", "slow", "--resamples", "200",
                 "--out", str(out), *target]) == 0  # fmt: skip
    assert out.with_suffix(".png").stat().st_size > 1000 and out.with_suffix(".pdf").is_file()


def test_cli_plot_curve_with_target_line_and_task_panels(results_csv, capsys):
    folder = results_csv.parent
    assert main(["plot", str(results_csv), "--reference", "slow", "--target-final", "--log-x"]) == 0
    assert main(["plot", str(results_csv), "--kind", "tasks"]) == 0
    for name in ("overall_vs_fwd_equiv", "metrics_vs_fwd_equiv"):
        assert (folder / f"{name}.png").stat().st_size > 1000 and (folder / f"{name}.pdf").is_file()
    assert main(["plot", str(results_csv), "--kind", "speedup"]) == 2
    assert "--kind speedup needs --reference VARIANT" in capsys.readouterr().err


def test_committed_results_without_per_prompt_scores_still_read(capsys):
    folder = Path(__file__).resolve().parents[2] / "results" / "shapes_quick"
    if not (folder / "results.csv").is_file():
        pytest.skip("no committed shapes_quick results")
    assert main(["table", str(folder), "--reference", "flow_grpo_nocfg", "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "† analytic binomial error" in out and "over 64 images per task" in out and "∞" not in out
