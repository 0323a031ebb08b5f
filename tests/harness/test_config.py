"""Strict config construction: unknown keys, wrong types and bad literals fail with the key's name."""

import math
import re
from dataclasses import dataclass
from typing import Literal

import pytest

from harness.budget import Budget
from harness.config import ConfigError, build, parse_overrides
from harness.evaluate import EvalSettings
from harness.optim import OptimConfig
from harness.trainer import LoopConfig
from harness.validation import require
from methods.diffusion_nft import DiffusionNFTConfig


@dataclass(frozen=True, kw_only=True)
class Example:
    lr: float = 1e-3
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    betas: tuple[float, float] = (0.9, 0.99)
    flag: bool = False
    name: str | None = None
    limit: int | None = 5


def test_valid_values_are_coerced():
    cfg = build(Example, {"lr": 1, "betas": [0.5, 0.6], "mode": "b", "flag": True, "name": "x"})
    assert cfg == Example(lr=1.0, betas=(0.5, 0.6), mode="b", flag=True, name="x")
    assert build(Example, {"limit": None, "name": None}) == Example(limit=None)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lrr": 1.0}, "unknown key config.lrr. Did you mean 'lr'\\?"),
        ({"steps": 2.5}, "config.steps = 2.5; expected an integer"),
        ({"steps": True}, "expected an integer"),
        ({"lr": "fast"}, "config.lr = 'fast'; expected a number"),
        ({"mode": "c"}, "config.mode = 'c'; allowed: 'a', 'b'"),
        ({"betas": [0.1]}, "expected 2 values"),
        ({"flag": "yes"}, "expected true or false"),
        ({"limit": "big"}, "config.limit = 'big' matches none of"),  # None accepts only None
        ({"name": 3}, "config.name = 3 matches none of"),
        ({"lr": 1.0, "limit": 2.5}, "config.limit = 2.5 matches none of"),
    ],
)
def test_errors_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        build(Example, values)


def test_method_config_overrides():
    cfg = build(
        DiffusionNFTConfig, parse_overrides(["beta=0.1", "decay_type=2", "loss_space=v"]), where="diffusion_nft"
    )
    assert (cfg.beta, cfg.decay_type, cfg.loss_space) == (0.1, 2, "v")
    with pytest.raises(ConfigError, match="diffusion_nft.decay_type = 3; allowed: 0, 1, 2"):
        build(DiffusionNFTConfig, {"decay_type": 3}, where="diffusion_nft")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["beta"])


@dataclass(frozen=True, kw_only=True)
class SelfChecked:
    rate: float = 0.1
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        require(math.isfinite(self.rate) and self.rate > 0, "rate", self.rate, "a finite number > 0")
        if not self.low < self.high:
            raise ValueError(f"the range needs low < high, got low {self.low}, high {self.high}")


def test_a_configs_own_check_names_the_full_path_and_the_value_as_given():
    with pytest.raises(ConfigError) as error:
        build(SelfChecked, {"rate": 0}, where="suite.methods[0].config")
    assert str(error.value) == "suite.methods[0].config.rate = 0: rate must be a finite number > 0, got 0.0"
    with pytest.raises(ConfigError, match=r"^suite\.x\.rate = nan: rate must be"):
        build(SelfChecked, {"rate": float("nan")}, where="suite.x")
    with pytest.raises(ConfigError, match=r"^suite\.x: the range needs low < high, got low 2\.0, high 1\.0$"):
        build(SelfChecked, {"low": 2, "high": 1}, where="suite.x")  # about no single field: the section


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (OptimConfig, {"lr": -1e-4}, "lr must be a finite number > 0, got -0.0001"),
        (OptimConfig, {"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
        (OptimConfig, {"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
        (OptimConfig, {"betas": (0.9, 1.0)}, "betas must be two numbers in [0, 1), got (0.9, 1.0)"),
        (OptimConfig, {"betas": (-0.1, 0.999)}, "betas must be two numbers in [0, 1)"),
        (OptimConfig, {"weight_decay": -0.1}, "weight_decay must be a finite number >= 0, got -0.1"),
        (OptimConfig, {"eps": 0.0}, "eps must be a finite number > 0, got 0.0"),
        (OptimConfig, {"grad_clip": 0.0}, "grad_clip must be a finite number > 0, got 0.0"),
        (OptimConfig, {"ema_max_decay": 1.0}, "ema_max_decay must be in [0, 1), got 1.0"),
        (LoopConfig, {"iterations": 0}, "iterations must be an integer >= 1, got 0"),
        (LoopConfig, {"images_per_prompt": 0}, "images_per_prompt must be an integer >= 1, got 0"),
        (LoopConfig, {"seed": -1}, "seed must be an integer >= 0, got -1"),
        (
            LoopConfig,
            {"eval_sampler": "heun"},
            "eval_sampler must be one of euler, dpm2, flow_sde, cps, dance_sde, got 'heun'",
        ),
        (EvalSettings, {"num_steps": 0}, "num_steps must be an integer >= 1, got 0"),
        (EvalSettings, {"guidance_scale": 0.5}, "guidance_scale must be a finite number >= 1 (1: no guidance)"),
        (EvalSettings, {"shift": float("nan")}, "shift must be a finite number > 0, got nan"),
        (EvalSettings, {"weights": "best"}, "weights must be one of train, old, ref, got 'best'"),
        (Budget, {"amount": float("nan")}, "amount must be a finite number > 0, got nan"),
        (Budget, {"eval_at": (0.5, 0.5)}, "eval_at must be increasing fractions in (0, 1], got [0.5, 0.5]"),
    ],
)
def test_configs_check_their_own_values(cls, values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(**values)
