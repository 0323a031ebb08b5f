"""Evaluation is deterministic and the CLI prints what it promises."""

import json

import pytest

from benchmarks.shapes.benchmark import ShapesBenchmark
from benchmarks.shapes.checkpoint import load_shapes_policy
from harness.cli import main
from harness.evaluate import EvalSettings, evaluate_policy
from harness.samplers import make_sampler
from rewards.geneval import TASKS


def test_same_checkpoint_same_numbers():
    policy = load_shapes_policy()
    benchmark = ShapesBenchmark(prompts_per_task=2, images_per_prompt=2)
    settings = EvalSettings(num_steps=4)
    first = evaluate_policy(policy, benchmark, make_sampler("euler"), settings, progress=False)
    second = evaluate_policy(policy, benchmark, make_sampler("euler"), settings, progress=False)
    assert first.scores == second.scores
    assert (first.images == second.images).all()
    assert first.images.shape == (24, 3, 32, 32) and set(first.scores) == set(benchmark.metrics)


def test_eval_prompts_are_balanced_and_fixed():
    prompts = ShapesBenchmark().eval_prompts()
    assert len(prompts) == 16 * 6
    assert [p.tag for p in prompts[::16]] == list(TASKS)
    assert prompts == ShapesBenchmark().eval_prompts()


def test_cli_evaluate_json(capsys, tmp_path):
    assert main(["evaluate", "shapes", "--json", "--steps", "2"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"overall", *TASKS} <= set(scores)
    assert scores["overall"] == pytest.approx(sum(scores[t] for t in TASKS) / 6, abs=1e-3)


def test_cli_list_and_bad_arguments(capsys):
    assert main(["list", "rewards"]) == 0
    assert "shapes_geneval" in capsys.readouterr().out
    assert main(["list", "benchmarks"]) == 0
    assert "shapes" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--cfg must be >= 1.0"):
        main(["evaluate", "shapes", "--cfg", "0.5"])
    with pytest.raises(SystemExit):
        main(["list", "optimizers"])


def test_cli_train_refuses_bad_input_before_compute():
    from harness.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key diffusion_nft.betta. Did you mean 'beta'"):
        main(["train", "shapes", "--method", "diffusion_nft", "--set", "betta=0.1"])
    with pytest.raises(KeyError, match="Did you mean 'flow_grpo'"):
        main(["train", "shapes", "--method", "flow_grpp"])
