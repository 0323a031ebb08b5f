"""``diffrl run FILE --check`` refuses every malformed suite before any model loads.

Each case writes a suite file with one mistake and runs the command line in-process: exit status 2, one
line on stderr that names the field (and what is allowed), no traceback, and no model loader called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.cli import USER_ERROR, main
from methods import METHODS
from tests.harness.test_suite import DELETE, VALID, with_change


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Every way a suite loads weights raises: checking a suite must not reach any of them."""
    import benchmarks.shapes.checkpoint
    import harness.runner
    from harness.policies.flux import FluxPolicy
    from harness.policies.sd3 import SD3Policy

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded while checking a suite")

    monkeypatch.setattr(benchmarks.shapes.checkpoint, "load_shapes_policy", refuse)
    monkeypatch.setattr(harness.runner, "load_model", refuse)
    monkeypatch.setattr(SD3Policy, "from_pretrained", refuse)
    monkeypatch.setattr(FluxPolicy, "from_pretrained", refuse)


def check(tmp_path: Path, capsys: pytest.CaptureFixture[str], data: dict[str, Any] | str) -> tuple[int, str]:
    """``diffrl run FILE --check`` on ``data`` (a mapping, or the file's text); returns (status, stderr)."""
    path = tmp_path / "suite.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    status = main(["run", str(path), "--check"])
    return status, capsys.readouterr().err


def test_a_valid_suite_passes_the_check_without_loading_a_model(tmp_path, capsys):
    assert check(tmp_path, capsys, VALID) == (0, "")


# (a change to the valid suite, as with_change takes it, and what the message must hold)
BAD_VALUES = {
    # Accepted before each config checked its own values:
    "negative lr": ("train.optim.lr", -1e-4, "suite.train.optim.lr = -0.0001: lr must be a finite number > 0"),
    "NaN reward weight": (
        "rewards.shapes_geneval.weight",
        float("nan"),
        "suite.rewards.shapes_geneval.weight = nan: weight must be",
    ),
    "nft beta 0": ("methods.0.config.beta", 0, "suite.methods[0].config.beta = 0: beta must be"),
    "nft timestep_fraction 0": (
        "methods.0.config.timestep_fraction",
        0,
        "suite.methods[0].config.timestep_fraction = 0: timestep_fraction",
    ),
    "grpo negative clip_range": (
        "methods.1.config.clip_range",
        -1.0,
        "suite.methods[1].config.clip_range = -1.0: clip_range must",
    ),
    "grpo negative noise_level": (
        "methods.1.config.noise_level",
        -0.5,
        "suite.methods[1].config.noise_level = -0.5: noise_level must",
    ),
    "betas out of range": ("train.optim.betas", [0.9, 1.0], "suite.train.optim.betas = [0.9, 1.0]: betas must be"),
    "ema decay 1": ("train.optim.ema_max_decay", 1.0, "suite.train.optim.ema_max_decay = 1.0: ema_max_decay must"),
    "infinite budget": ("budget.amount", float("inf"), "suite.budget.amount = inf: amount must be a finite number"),
    "eval shift 0": ("eval.shift", 0, "suite.eval.shift = 0: shift must be a finite number > 0"),
    "NaN in a reward range": (
        "rewards.shapes_geneval",
        {"normalize": "fixed_range", "range": [1, float("nan")]},
        "suite.rewards.shapes_geneval.range = [1, nan]: range must be",
    ),
    # Refused before as well:
    "unknown key": ("seed", [0], "unknown key suite.seed. Did you mean 'seeds'?"),
    "unknown method key": ("methods.0.config.betta", 0.1, "suite.methods[0].config.betta. Did you mean 'beta'?"),
    "wrong type": ("budget.amount", "lots", "suite.budget.amount = 'lots'; expected a number"),
    "wrong literal": ("methods.0.config.loss_space", "eps", "loss_space = 'eps'; allowed: 'x0', 'v'"),
    "unknown method": (
        "methods.0.method",
        "diffusion_nf",
        "unknown method 'diffusion_nf'. Did you mean 'diffusion_nft'?",
    ),
    "unknown reward": ("rewards", {"pickscor": {}}, "suite.rewards.pickscor: unknown reward 'pickscor'"),
    "unknown benchmark": ("benchmark.name", "shape", "suite.benchmark.name: unknown benchmark 'shape'"),
    "flow_grpo takes no sampler": ("methods.1.config.sampler", "euler", "unknown key suite.methods[1].config.sampler"),
    "draft with a rule reward": (
        "methods.0",
        {"label": "draft", "method": "draft"},
        "suite.methods[0].method = DRaFT backpropagates through the reward, but rewards ['shapes_geneval'] are not",
    ),
    "missing budget": ("budget", DELETE, "missing key suite.budget"),
    "label used twice": ("methods.1.label", "nft", "suite.methods[1].label = 'nft' is used twice"),
    "one image per prompt": ("train.images_per_prompt", 1, "suite.train.images_per_prompt = 1: images_per_prompt"),
    "unknown reference": ("report.reference", "flowgrpo", "suite.report.reference = 'flowgrpo'; allowed: nft, grpo"),
    "an absent GPU for the tiny DiT": ("model.device", "cuda:63", "suite.model.device = 'cuda:63', but this machine"),
}


@pytest.mark.parametrize(("path", "value", "message"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_a_bad_value_is_refused_in_one_line_before_any_model_loads(tmp_path, capsys, path, value, message):
    status, err = check(tmp_path, capsys, with_change(path, value))
    assert status == USER_ERROR == 2, err
    assert err.startswith("invalid suite: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


def test_a_duplicate_yaml_key_is_refused(tmp_path, capsys):
    status, err = check(tmp_path, capsys, yaml.safe_dump(VALID) + "seeds: [3]\n")
    assert status == 2 and err.count("\n") == 1
    assert "duplicate key 'seeds' at line" in err


def test_invalid_yaml_and_a_missing_file_are_refused(tmp_path, capsys):
    status, err = check(tmp_path, capsys, "name: [unclosed\n")
    assert status == 2 and "is not valid YAML" in err and "Traceback" not in err
    assert main(["run", str(tmp_path / "missing.yaml"), "--check"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_log_prob_method_with_a_deterministic_sampler_is_refused(tmp_path, capsys):
    """Declared capabilities, not the method's name: any method that needs log-probs refuses an ODE sampler."""
    with METHODS.temporarily("needs_log_prob", "tests.harness.test_suite:_NeedsLogProb"):
        bad = with_change("methods.0", {"label": "a", "method": "needs_log_prob", "config": {"sampler": "euler"}})
        status, err = check(tmp_path, capsys, bad)
    assert status == 2
    assert "suite.methods[0].config.sampler = 'euler' is deterministic" in err and "allowed: flow_sde, cps" in err
