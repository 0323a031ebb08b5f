"""Strict config construction: unknown keys, wrong types and bad literals fail with the key's name."""

from dataclasses import dataclass
from typing import Literal

import pytest

from harness.config import ConfigError, build, parse_overrides
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
