"""Evaluation is deterministic and the CLI prints what it promises."""

import json

import pytest
import yaml

from benchmarks.shapes.benchmark import ShapesBenchmark
from benchmarks.shapes.checkpoint import load_shapes_policy
from harness.cli import main
from harness.evaluate import EvalSettings, evaluate_policy
from harness.geneval_rules import TASKS
from harness.samplers import make_sampler


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


@pytest.fixture
def no_model_loads(monkeypatch):
    import harness.runner

    def refuse(*args: object) -> None:
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(harness.runner, "load_model", refuse)
    monkeypatch.setattr(harness.runner, "load_policy", refuse)


def test_cli_list_and_bad_arguments(capsys, no_model_loads):
    assert main(["list", "rewards"]) == 0
    assert "shapes_geneval" in capsys.readouterr().out
    assert main(["list", "benchmarks"]) == 0
    assert "shapes" in capsys.readouterr().out
    assert main(["evaluate", "shapes", "--cfg", "0.5"]) == 2
    assert "--cfg: guidance_scale must be a finite number >= 1 (1: no guidance), got 0.5" in capsys.readouterr().err
    assert main(["evaluate", "shapes", "--steps", "0"]) == 2
    assert "suite.eval.num_steps = 0: num_steps must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["list", "optimizers"])
    with pytest.raises(SystemExit):
        main(["compare", "shapes"])  # replaced by suites (diffrl run)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "betta=0.1"], "unknown key suite.methods[0].config.betta. Did you mean 'beta'?"),
        (["--set", "beta=0"], "suite.methods[0].config.beta = 0: beta must be"),
        (["--lr", "-1"], "suite.train.optim.lr = -1.0: lr must be a finite number > 0"),
        (["--budget", "-5"], "suite.budget.amount = -5.0: amount must be a finite number > 0"),
        (["--eval-at", "0.5", "0.25"], "suite.budget.eval_at = [0.5, 0.25]: eval_at must be increasing"),
        (["--reward", "pickscor"], "suite.rewards.pickscor: unknown reward 'pickscor'. Did you mean 'pickscore'?"),
        (["--judgement", "strict", "--reward", "shapes_classifier"], "--judgement strict configures --reward"),
    ],
)
def test_cli_train_refuses_bad_flags_before_compute(capsys, no_model_loads, flags, message):
    assert main(["train", "shapes", "--method", "diffusion_nft", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffrl train: ") and message in err and err.count("\n") == 1, err


def test_cli_train_refuses_an_unknown_method_and_a_rule_reward_for_draft(capsys, no_model_loads):
    assert main(["train", "shapes", "--method", "flow_grpp"]) == 2
    assert "unknown method 'flow_grpp'. Did you mean 'flow_grpo'?" in capsys.readouterr().err
    assert main(["train", "shapes", "--method", "draft"]) == 2
    assert "backpropagates through the reward, but rewards ['shapes_geneval'] are not" in capsys.readouterr().err


def test_cli_train_is_a_one_variant_suite(capsys, no_model_loads, tmp_path):
    """--check prints the suite the flags make; saved, `diffrl run` accepts it as it is."""
    flags = ["--set", "num_steps=4", "--iterations", "30", "--budget", "5000", "--eval-at", "0.5", "--seed", "3"]
    assert main(["train", "shapes", "--method", "diffusion_nft", *flags, "--check"]) == 0
    text = capsys.readouterr().out
    suite = yaml.safe_load(text)
    assert suite["name"] == "train-diffusion_nft" and suite["seeds"] == [3]
    assert suite["budget"] == {"unit": "fwd_equiv", "amount": 5000.0, "eval_at": [0.5]}
    assert suite["train"]["max_iterations"] == 30 and suite["train"]["optim"]["lr"] == 1e-4
    assert suite["methods"][0]["config"]["num_steps"] == 4 and suite["rewards"]["shapes_geneval"]["options"] == {
        "judgement": "correct"
    }
    (tmp_path / "train.yaml").write_text(text)
    assert main(["run", str(tmp_path / "train.yaml"), "--check"]) == 0


def test_per_prompt_scores_add_up_to_the_benchmark_scores():
    import numpy as np

    from harness.evaluate import PromptScores, prompt_scores_frame
    from harness.statistics import prompt_metric

    policy = load_shapes_policy()
    benchmark = ShapesBenchmark(prompts_per_task=3, images_per_prompt=2)
    output = evaluate_policy(policy, benchmark, make_sampler("euler"), EvalSettings(num_steps=4), progress=False)
    per_prompt = output.per_prompt
    assert per_prompt is not None and len(per_prompt.tags) == 18 and per_prompt.tags[::3] == tuple(TASKS)
    for metric, value in output.scores.items():
        assert float(prompt_metric(np.array(per_prompt.scores[metric]), per_prompt.tags)) == pytest.approx(value)
    assert np.isnan(per_prompt.scores["counting"][0])  # a single_object prompt has no counting score
    record = json.loads(json.dumps(per_prompt.to_json()))  # JSON round trip: NaN as null
    assert PromptScores.from_json(record).tags == per_prompt.tags
    frame = prompt_scores_frame([{"variant": "v", "seed": 0, "iteration": 0, "eval_point": 0, **record}])
    assert len(frame) == 18 and list(frame.columns[:6]) == [
        "variant",
        "seed",
        "iteration",
        "eval_point",
        "prompt",
        "tag",
    ]


def test_shapes_eval_set_size_is_an_option():
    from harness.config import ConfigError, call_checked

    sized = call_checked(ShapesBenchmark, {"prompts_per_task": 32, "images_per_prompt": 8}, "suite.benchmark.options")
    assert len(sized.eval_prompts()) * sized.images_per_prompt == 6 * 32 * 8
    with pytest.raises(ConfigError, match="prompts_per_task = 0: prompts_per_task must be an integer >= 1"):
        call_checked(ShapesBenchmark, {"prompts_per_task": 0}, "suite.benchmark.options")
