"""`diffrl report` on a synthetic suite folder: every table and figure, each with the command that reproduces it."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.cli import main
from harness.report import Comparison, report_comparison, write_report
from harness.statistics import Target
from harness.suite import validate_suite
from tests.harness.test_runner import TINY

CURVES = {  # overall at iterations 0, 2, 4 (the untrained model, 50% and 100% of TINY's budget)
    "nft": [[0.2, 0.5, 0.6], [0.2, 0.45, 0.55], [0.2, 0.4, 0.6]],
    "grpo": [[0.2, 0.25, 0.4], [0.2, 0.3, 0.35], [0.2, 0.22, 0.3]],
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    suite = validate_suite(TINY)
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite.resolved(), sort_keys=False))
    rows = []
    for variant, seeds in CURVES.items():
        for seed, values in enumerate(seeds):
            for point, value in enumerate(values):
                rows.append({"suite": "tiny", "method": variant, "variant": variant, "seed": seed, "iteration": 2 * point,
                             "eval_point": point, "budget/fraction": point / 2, "compute/fwd_equiv": 1000 * point,
                             "eval/overall": value, "eval/single_object": value, "eval/counting": value})  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    return tmp_path


def test_the_report_prints_every_table_with_its_command(folder):
    text = write_report(folder).read_text()
    for section in ("## Final scores", "## Compute to reach overall = ", "## Aggregates over seeds × tasks",
                    "## overall at matched compute", "## Every metric", "## Provenance"):  # fmt: skip
        assert section in text
    assert "∞" not in text and "Seeds per variant: 3" in text
    assert "evaluated before training and at 50%, 100% of it" in text
    flags = "--metric eval/overall --unit iteration --reference grpo --target-gain 0.8"
    assert f"Table: `diffrl table {folder} {flags}`" in text
    assert f"Figure: `diffrl plot {folder} {flags} --kind speedup`" in text
    for name in ("overall_vs_iteration", "metrics_vs_iteration", "speedup_overall_iteration"):
        assert (folder / f"{name}.png").is_file() and (folder / f"{name}.pdf").is_file()
    # Eval SE: no per-prompt scores here, so the binomial one from the suite's eval set (1 prompt × 1 image per task).
    assert "† analytic binomial error of the per-task accuracies over 1 images per task" in text


def test_the_printed_table_command_reproduces_the_report_s_numbers(folder, capsys):
    text = write_report(folder).read_text()
    command = re.search(r"Table: `diffrl table (\S+) ([^`]+)`", text)
    assert command is not None
    assert main(["table", command.group(1), *command.group(2).split()]) == 0
    printed = capsys.readouterr().out
    target_table = text.split("## Compute to reach")[1].split("Table:")[0].split("\n", 2)[2].strip()
    assert target_table in printed


def test_the_report_section_picks_the_target():
    config = yaml.safe_load(yaml.safe_dump(validate_suite(TINY).resolved()))
    assert report_comparison(config) == Comparison("eval/overall", "iteration", "grpo", Target("reference_gain", 0.8))
    config["report"]["target"] = 0.3
    assert report_comparison(config).target == Target("absolute", 0.3)
    del config["report"]["target_gain"]  # a suite.yaml written before target_gain existed
    config["report"]["target"] = None
    assert report_comparison(config).target == Target("reference_gain", 0.8)
    suite = validate_suite({**TINY, "report": {"reference": "grpo", "target_gain": 1.0}})
    assert suite.config.report.target_gain == 1.0
    with pytest.raises(ValueError, match=r"target_gain = 0: target_gain must be a fraction in \(0, 1\]"):
        validate_suite({**TINY, "report": {"reference": "grpo", "target_gain": 0}})
