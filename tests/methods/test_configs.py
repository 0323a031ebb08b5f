"""Every method config checks its own values when built (so `diffrl run --check` refuses them before any model)."""

import dataclasses
import math
import typing

import pytest

from methods import METHODS


def number_fields(config_cls: type) -> list[str]:
    hints = typing.get_type_hints(config_cls)
    return [f.name for f in dataclasses.fields(config_cls) if hints[f.name] in (int, float)]


@pytest.mark.parametrize("name", METHODS.keys())
def test_defaults_are_valid_and_every_number_refuses_nan_and_inf(name):
    config_cls = METHODS.get(name).Config
    config_cls()
    for field in number_fields(config_cls):
        for bad in (math.nan, math.inf):
            with pytest.raises(ValueError, match=field):
                config_cls(**{field: bad})


@pytest.mark.parametrize("name", METHODS.keys())
def test_every_literal_refuses_an_unknown_choice(name):
    config_cls = METHODS.get(name).Config
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if typing.get_origin(hints[field.name]) is typing.Literal:
            with pytest.raises(ValueError, match=f"{field.name} must be one of"):
                config_cls(**{field.name: "not_a_choice"})


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        ("diffusion_nft", "beta", 0.0),
        ("diffusion_nft", "timestep_fraction", 0.0),
        ("diffusion_nft", "train_batch_size", 0),
        ("flow_grpo", "clip_range", -1.0),
        ("flow_grpo", "noise_level", -0.5),
        ("flow_grpo", "kl_coef", -0.01),
        ("flow_grpo_fast", "sde_window_size", 0),
        ("online_dpo", "beta", -100.0),
        ("awm", "ema_decay_max", 1.0),
        ("rwr", "temperature", 0.0),
        ("raft", "top_k", 0),
        ("draft", "last_k", 0),
    ],
)
def test_bad_values_are_refused_with_the_field_and_the_value(name, field, value):
    with pytest.raises(ValueError, match=rf"{field}.*{value!r}|{field}.*{value}"):
        METHODS.get(name).Config(**{field: value})
