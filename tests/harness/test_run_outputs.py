"""What a run leaves beside its results: sample grids in the trackers at each evaluation, and a timing.json
that sums every invocation of a resumed run (each listed beside the sums)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import harness.runner as runner
from harness.runner import cumulative_timing, run_suite, timing_entry
from harness.suite import validate_suite
from tests.harness.test_runner import TINY, FailsOnce

ONE_CELL = {**TINY, "seeds": [0], "methods": TINY["methods"][:1], "report": {}}


def test_timing_sums_every_invocation_and_lists_each():
    first = timing_entry(10.0, 2.0, {"sampling": 3.0, "reward": 1.0, "training": 2.0})
    assert first["harness_seconds"] == 2.0 and first["harness_fraction"] == 0.2
    once = cumulative_timing(None, first)
    assert once["wall_seconds"] == 10.0 and len(once["invocations"]) == 1
    second = timing_entry(5.0, 1.0, {"sampling": 1.0, "reward": 0.5, "training": 1.5})
    twice = cumulative_timing(once, second)
    assert [i["wall_seconds"] for i in twice["invocations"]] == [10.0, 5.0]
    assert twice["wall_seconds"] == 15.0 and twice["eval_seconds"] == 3.0 and twice["harness_seconds"] == 3.0
    assert twice["method_seconds"] == {"sampling": 4.0, "reward": 1.5, "training": 3.5}
    legacy = dict(first)  # a timing.json written before invocations were listed
    assert cumulative_timing(legacy, second)["wall_seconds"] == 15.0


def test_a_resumed_run_times_both_invocations_and_logs_grids_to_trackers(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    suite = validate_suite({**ONE_CELL, "trackers": ["tensorboard"]})
    build = runner.build_reward
    monkeypatch.setattr(runner, "build_reward", lambda suite, label=None: FailsOnce(build(suite, label), at=3))
    assert run_suite(suite, tmp_path, progress=False).failed  # the scorer crashes mid-run
    first = json.loads((tmp_path / "timing.json").read_text())
    monkeypatch.setattr(runner, "build_reward", build)
    assert not run_suite(suite, tmp_path, progress=False).failed  # resumed from the checkpoint
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert len(first["invocations"]) == 1 and len(timing["invocations"]) == 2
    assert timing["invocations"][0] == first["invocations"][0]
    assert timing["wall_seconds"] == pytest.approx(sum(i["wall_seconds"] for i in timing["invocations"]), abs=0.02)
    parts = sum(timing["method_seconds"].values()) + timing["eval_seconds"] + timing["harness_seconds"]
    assert parts == pytest.approx(timing["wall_seconds"], abs=0.05)
    steps = []
    for folder in {p.parent for p in Path(tmp_path / "trackers").rglob("events.out.tfevents.*")}:
        accumulator = EventAccumulator(str(folder), size_guidance={"images": 0})
        accumulator.Reload()
        if "eval/samples" in accumulator.Tags()["images"]:
            steps += [event.step for event in accumulator.Images("eval/samples")]
    evaluated = [json.loads(line)["iteration"] for line in (tmp_path / "cells/nft/seed0/evals.jsonl").open()]
    assert set(steps) == set(evaluated) and len(evaluated) == 3  # before training, half-way, at the end
