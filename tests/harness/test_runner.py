"""`diffrl run`: cells, failures, resume after a crash or kill -9, the results store, the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import harness.runner as runner
from harness.cli import main
from harness.runner import run_suite
from harness.store import read_results
from harness.suite import validate_suite
from harness.types import RewardError, RewardSpec
from rewards import REWARDS

TINY = {
    "name": "tiny",
    "benchmark": {"name": "shapes", "options": {"prompts_per_task": 1, "images_per_prompt": 1}},
    "rewards": {"shapes_geneval": {"options": {"judgement": "correct"}}},
    "methods": [
        {"label": "nft", "method": "diffusion_nft", "config": {"num_steps": 2}},
        {
            "label": "grpo",
            "method": "flow_grpo",
            "config": {"num_steps": 2, "rollout_cfg": 1.5, "train_cfg": 1.5},
            "eval_cfg": 1.5,
        },
    ],  # fmt: skip
    "seeds": [0, 1],
    "budget": {"unit": "iterations", "amount": 4, "eval_at": [0.5, 1.0]},
    "train": {"prompts_per_iteration": 2, "images_per_prompt": 3, "checkpoint_every": 1},
    "eval": {"num_steps": 2},
    "report": {"reference": "grpo"},
}
# Wall-clock columns differ between any two runs; everything else must be identical.
CLOCK = ("seconds", "time/", "wall")


def numbers(df: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in df.columns if not any(k in c for k in CLOCK)]
    return df[keep].sort_values(["variant", "seed", "iteration"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    outcome = run_suite(validate_suite(TINY), out, progress=False)
    assert [c.status for c in outcome.cells] == ["done"] * 4
    return out


def test_one_row_per_evaluation_with_every_unit_and_metric(uninterrupted):
    df = read_results(uninterrupted)
    assert len(df) == 4 * 3  # 4 cells x (untrained, 50%, 100%)
    assert set(df["variant"]) == {"nft", "grpo"} and set(df["method"]) == {"diffusion_nft", "flow_grpo"}
    assert (df["suite"] == "tiny").all()
    for column in ("compute/fwd_equiv", "compute/flops", "compute/wall_seconds", "compute/images_sampled",
                   "iteration", "eval/overall", "eval/counting", "time/elapsed", "eval_point", "budget/fraction"):  # fmt: skip
        assert column in df.columns
    assert sorted(df["iteration"].unique()) == [0, 2, 4]
    fractions = df.groupby(["variant", "seed"])["budget/fraction"].apply(tuple)
    assert set(fractions) == {(0.0, 0.5, 1.0)}
    csv = pd.read_csv(uninterrupted / "results.csv")
    assert numbers(csv).equals(numbers(df))
    metadata = json.loads((uninterrupted / "metadata.json").read_text())
    assert len(metadata["config_hash"]) == 64 and torch.__version__.startswith(metadata["packages"]["torch"])
    assert {c["status"] for c in metadata["cells"]} == {"done"}


def test_the_untrained_model_is_evaluated_once_per_eval_protocol(uninterrupted):
    df = read_results(uninterrupted)
    base = df[df["iteration"] == 0].sort_values(["variant", "seed"])
    # Computed by the first cell of each protocol, reused (eval_fwd 0) by the other seed.
    # 6 prompts x 1 image x 2 steps; CFG 1.5 batches the unconditional half too.
    assert sorted(base["compute/eval_fwd"].tolist()) == [0, 0, 12, 24]
    for _, rows in base.groupby("variant"):
        assert rows["eval/overall"].nunique() == 1
    assert len(json.loads((uninterrupted / "base_evals.json").read_text())) == 2  # CFG 1 and 1.5


class FailsOnce:
    """Wraps the suite's reward: raises on its ``at``-th call, like a scorer crashing mid-run."""

    def __init__(self, reward, at: int) -> None:
        self.reward, self.at, self.calls = reward, at, 0
        self.spec = reward.spec

    def __getattr__(self, name):  # state_dict and friends: checkpoint the wrapped reward's state
        return getattr(self.reward, name)

    def __call__(self, images, prompts):
        self.calls += 1
        if self.calls == self.at:
            raise RewardError("scorer crashed")
        return self.reward(images, prompts)


def test_a_failed_cell_is_recorded_and_resumes_to_the_same_table(uninterrupted, tmp_path, monkeypatch):
    build = runner.build_reward
    failing = FailsOnce(build(validate_suite(TINY)), at=3)  # one crash in the whole suite (the first cell)
    monkeypatch.setattr(runner, "build_reward", lambda suite, label=None: failing)
    outcome = run_suite(validate_suite(TINY), tmp_path, progress=False)
    assert [(c.label, c.seed, c.status) for c in outcome.cells] == [
        ("nft", 0, "failed"), ("nft", 1, "done"), ("grpo", 0, "done"), ("grpo", 1, "done")
    ]  # fmt: skip
    status = json.loads((tmp_path / "cells/nft/seed0/status.json").read_text())
    assert status["status"] == "failed" and "RewardError: scorer crashed" in status["error"]
    assert "nft" in set(read_results(tmp_path).query("seed == 1")["variant"])  # the other cells went on
    # Checkpointed after iteration 2 (its evaluation): the rerun resumes there, not from scratch.
    evals_before = [json.loads(line)["iteration"] for line in (tmp_path / "cells/nft/seed0/evals.jsonl").open()]
    assert evals_before == [0, 2]
    monkeypatch.setattr(runner, "build_reward", build)
    resumed = run_suite(validate_suite(TINY), tmp_path, progress=False)
    assert resumed.failed == []
    iterations = [json.loads(line)["iteration"] for line in (tmp_path / "cells/nft/seed0/iterations.jsonl").open()]
    assert iterations == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(numbers(read_results(tmp_path)), numbers(read_results(uninterrupted)))
    pd.testing.assert_frame_equal(prompt_rows(tmp_path), prompt_rows(uninterrupted))  # per-prompt scores too


def prompt_rows(out: Path) -> pd.DataFrame:
    frame = pd.read_parquet(out / "eval_prompts.parquet")
    return frame.sort_values(["variant", "seed", "iteration", "prompt"]).reset_index(drop=True)


def test_each_evaluation_keeps_its_per_prompt_scores(uninterrupted):
    from harness.statistics import prompt_metric

    df, prompts = read_results(uninterrupted), prompt_rows(uninterrupted)
    assert len(prompts) == len(df) * 6  # 6 eval prompts (1 per task) per evaluation, the reused base one included
    for row in df.itertuples(index=False):
        own = prompts[
            (prompts.variant == row.variant) & (prompts.seed == row.seed) & (prompts.iteration == row.iteration)
        ]
        assert float(prompt_metric(own["eval/overall"].to_numpy(), list(own["tag"]))) == pytest.approx(
            row[df.columns.get_loc("eval/overall")]
        )
    assert len(json.loads((uninterrupted / "base_eval_prompts.json").read_text())) == 2  # one per eval protocol
    cell = [json.loads(line) for line in (uninterrupted / "cells/grpo/seed1/eval_prompts.jsonl").open()]
    assert [r["iteration"] for r in cell] == [0, 2, 4] and len(cell[0]["tags"]) == 6


def test_finished_cells_are_never_rerun(uninterrupted, monkeypatch):
    before = read_results(uninterrupted)
    monkeypatch.setattr(runner, "train", lambda *a, **k: pytest.fail("a finished cell was trained again"))
    outcome = run_suite(validate_suite(TINY), uninterrupted, progress=False)
    assert [c.status for c in outcome.cells] == ["done"] * 4
    pd.testing.assert_frame_equal(numbers(read_results(uninterrupted)), numbers(before))


def test_cells_of_another_configuration_are_refused_before_any_compute(uninterrupted, monkeypatch):
    monkeypatch.setattr(runner, "train", lambda *a, **k: pytest.fail("computed before refusing"))
    changed = {**TINY, "budget": {**TINY["budget"], "amount": 5}}
    with pytest.raises(RuntimeError, match="hold runs of another configuration"):
        run_suite(validate_suite(changed), uninterrupted, progress=False)


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_the_same_table(uninterrupted, tmp_path):
    suite_file = tmp_path / "tiny.yaml"
    suite_file.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "harness.cli", "run", str(suite_file), "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    evals = out / "cells/nft/seed1/evals.jsonl"  # the second cell: killed in the middle of the suite
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if evals.is_file() and len(evals.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert json.loads((out / "cells/nft/seed1/status.json").read_text())["status"] == "running"
    assert main(["run", str(suite_file), "--out", str(out), "--no-progress"]) == 0
    pd.testing.assert_frame_equal(numbers(read_results(out)), numbers(read_results(uninterrupted)))


class CrashingReward:
    """A registered-for-the-test reward whose scorer always crashes."""

    spec = RewardSpec(name="crashing", version="0", description="raises on every call")

    def __call__(self, images, prompts):
        raise RewardError("scorer crashed")


def test_the_cli_reports_a_failed_cell_in_its_exit_status(tmp_path, capsys):
    broken = {**TINY, "seeds": [0], "methods": [
        TINY["methods"][0], {**TINY["methods"][0], "label": "bad", "rewards": {"crashing": {}}},
    ], "report": {}}  # fmt: skip
    suite_file = tmp_path / "broken.yaml"
    suite_file.write_text(yaml.safe_dump(broken))
    with REWARDS.temporarily("crashing", f"{__name__}:CrashingReward"):
        assert main(["run", str(suite_file), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    assert "FAILED bad seed 0: RewardError: scorer crashed" in capsys.readouterr().err
    readme = (tmp_path / "out/README.md").read_text()
    assert "## Failed cells" in readme and "bad seed 0" in readme


def test_an_invalid_suite_exits_2_before_running(tmp_path, capsys):
    suite_file = tmp_path / "bad.yaml"
    suite_file.write_text(yaml.safe_dump({**TINY, "seed": [0]}))
    assert main(["run", str(suite_file), "--out", str(tmp_path / "out")]) == 2
    assert "Did you mean 'seeds'?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_report_shows_curves_tables_samples_config_and_provenance(uninterrupted):
    readme = uninterrupted / "README.md"
    assert main(["report", str(uninterrupted)]) == 0
    text = readme.read_text()
    for section in ("## Final scores", "## Compute to reach overall", "## Samples", "## Provenance",
                    "## Resolved suite config", "![overall against iteration](overall_vs_iteration.png)"):  # fmt: skip
        assert section in text
    for name in ("overall_vs_iteration.png", "overall_vs_iteration.pdf", "metrics_vs_iteration.png", "table.md",
                 "table.tex", "samples.png", "samples/base_cfg1.png", "samples/nft_seed0_point2.png"):  # fmt: skip
        assert (uninterrupted / name).is_file(), name
    table = (uninterrupted / "table.md").read_text()
    assert "| grpo | 2 |" in table and "∞" not in table and "bootstrap over the 6 eval prompts" in table
    assert f"Table: `diffrl table {uninterrupted} --metric eval/overall --unit iteration --reference grpo" in text
    assert "speedup_overall_iteration.png" in text and (uninterrupted / "speedup_overall_iteration.pdf").is_file()


def test_trackers_log_each_cell_through_accelerate(tmp_path):
    pytest.importorskip("tensorboard")
    suite = validate_suite({**TINY, "seeds": [0], "methods": TINY["methods"][:1], "report": {},
                            "trackers": ["tensorboard"]})  # fmt: skip
    run_suite(suite, tmp_path, progress=False)
    events = list((tmp_path / "trackers").rglob("events.out.tfevents.*"))
    assert events and any("nft" in str(path) for path in events)


def test_bench_overhead_splits_a_fresh_run_of_a_suite(tmp_path):
    from harness.bench.methods import bench_overhead

    suite_file = tmp_path / "one.yaml"
    suite_file.write_text(yaml.safe_dump({**TINY, "seeds": [0], "methods": TINY["methods"][:1], "report": {}}))
    table = bench_overhead(str(suite_file), tmp_path / "bench", threads=1).read_text()
    assert "| harness overhead |" in table and "| evaluation |" in table
    timing = json.loads((tmp_path / "bench/overhead_tiny.json").read_text())
    parts = sum(timing["method_seconds"].values()) + timing["eval_seconds"] + timing["harness_seconds"]
    assert parts == pytest.approx(timing["wall_seconds"], abs=0.05)  # each part is rounded to 0.01 s
    assert timing["method_seconds"]["training"] > 0 and timing["eval_seconds"] > 0


def test_running_normalisation_state_survives_a_resume(tmp_path, monkeypatch):
    """The running mean/std of a normalised reward is part of the checkpoint."""
    one = {**TINY, "seeds": [0], "methods": TINY["methods"][:1], "report": {},
           "rewards": {"shapes_geneval": {"options": {"judgement": "correct"}, "normalize": "running"}}}  # fmt: skip
    run_suite(validate_suite(one), tmp_path / "a", progress=False)
    build = runner.build_reward
    monkeypatch.setattr(runner, "build_reward", lambda suite, label=None: FailsOnce(build(suite, label), at=3))
    assert run_suite(validate_suite(one), tmp_path / "b", progress=False).failed
    monkeypatch.setattr(runner, "build_reward", build)
    assert run_suite(validate_suite(one), tmp_path / "b", progress=False).failed == []
    logs = [(tmp_path / run / "cells/nft/seed0/iterations.jsonl").read_text() for run in ("a", "b")]
    strip = [[{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in log.splitlines()]
             for log in logs]  # fmt: skip
    assert strip[0] == strip[1] and strip[0][-1]["train/reward_mean"] != 0  # standardised rewards, identical
    pd.testing.assert_frame_equal(numbers(read_results(tmp_path / "a")), numbers(read_results(tmp_path / "b")))
