"""Reward options refuse bad values where they are built; each message names the field, the value and what is allowed."""

from __future__ import annotations

import math

import pytest
import torch

from harness.geneval_rules import GenEvalRules
from harness.types import Prompt, RewardSpec
from rewards.base import WeightedReward
from rewards.normalize import FixedRange, RunningMeanStd
from rewards.shapes_classifier import ClassifierConfig, RelationCalibration


class Constant:
    def __init__(self, value: float, value_range: tuple[float, float] = (0.0, 1.0)) -> None:
        self.value = value
        self.spec = RewardSpec(name="const", version="1", description="constant", value_range=value_range)

    def __call__(self, images, prompts):
        return torch.full((images.shape[0],), self.value)


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (math.nan, "weight of reward 'a' must be a finite number, got nan"),
        (math.inf, "weight of reward 'a' must be a finite number, got inf"),
        (-0.5, "weight of reward 'a' must be >= 0, got -0.5"),
        ("1", "weight of reward 'a' must be a finite number, got '1'"),
        (True, "weight of reward 'a' must be a finite number, got True"),
    ],
)
def test_weighted_reward_refuses_nan_infinite_or_negative_weights(weight, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        WeightedReward({"a": Constant(0.5)}, {"a": weight})


def test_a_zero_weight_keeps_the_scores_out_of_the_sum_even_for_an_unbounded_normalised_range():
    combined = WeightedReward(
        {"a": Constant(0.5), "b": Constant(2.0)}, {"a": 1.0, "b": 0.0}, normalizers={"b": RunningMeanStd()}
    )
    assert combined.spec.value_range == (0.0, 1.0)
    scores = combined(torch.zeros(2, 3, 4, 4), [Prompt("x")] * 2)
    assert scores.tolist() == [0.5, 0.5] and combined.last_components["b"].tolist() == [2.0, 2.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"low": math.nan, "high": 1.0}, "FixedRange low must be a finite number, got nan"),
        ({"low": 0.0, "high": math.inf}, "FixedRange high must be a finite number, got inf"),
        ({"low": 1.0, "high": 0.0}, "FixedRange needs high > low, got low=1.0, high=0.0"),
    ],
)
def test_fixed_range_refuses_non_finite_or_reversed_bounds(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        FixedRange(**kwargs)


@pytest.mark.parametrize("eps", [0.0, -1e-6, math.nan, math.inf])
def test_running_mean_std_refuses_an_eps_that_is_not_a_finite_positive_number(eps):
    with pytest.raises(ValueError, match=r"^RunningMeanStd eps must be a finite number > 0, got "):
        RunningMeanStd(eps=eps)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": ""}, "name must be a non-empty string, got ''"),
        ({"value_range": (1.0, 0.0)}, r"value_range must be .* with low <= high; got \(1.0, 0.0\)"),
        ({"value_range": (0.0, math.nan)}, r"value_range must be .*not NaN.*got \(0.0, nan\)"),
        ({"value_range": (0.0,)}, r"value_range must be a \(low, high\) pair"),
    ],
)
def test_reward_spec_refuses_a_nameless_spec_or_a_nan_or_reversed_range(kwargs, message):
    fields = {"name": "r", "version": "1", "description": "d"} | kwargs
    with pytest.raises(ValueError, match=message):
        RewardSpec(**fields)


def test_reward_spec_accepts_an_unbounded_range():
    assert (
        RewardSpec(name="r", version="1", description="d", value_range=(-math.inf, math.inf)).value_range[1] == math.inf
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": math.nan}, "threshold must be a finite number, got nan"),
        ({"threshold": 1.5}, r"threshold must be in \[0, 1\], got 1.5"),
        ({"counting_threshold": -0.1}, r"counting_threshold must be in \[0, 1\], got -0.1"),
        ({"max_overlap": 2.0}, r"max_overlap must be in \[0, 1\], got 2.0"),
        ({"max_objects": 0}, "max_objects must be an integer >= 1, got 0"),
        ({"max_objects": 2.5}, "max_objects must be an integer >= 1, got 2.5"),
        ({"position_threshold": -0.1}, "position_threshold must be >= 0, got -0.1"),
    ],
)
def test_geneval_rules_refuse_thresholds_outside_their_range(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        GenEvalRules(**kwargs)


def test_geneval_rules_accept_the_official_defaults_and_the_extremes():
    assert GenEvalRules() == GenEvalRules(threshold=0.3, counting_threshold=0.9, max_objects=16, max_overlap=1.0)
    GenEvalRules(threshold=0.0, counting_threshold=1.0, max_overlap=0.0, position_threshold=0.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sharpness": 0.0}, "sharpness must be > 0, got 0.0"),
        ({"sharpness": math.nan}, "sharpness must be a finite number, got nan"),
        ({"temperature": -0.1}, "temperature must be >= 0, got -0.1"),
        ({"temperature": math.inf}, "temperature must be a finite number, got inf"),
    ],
)
def test_relation_calibration_refuses_bad_sharpness_or_temperature(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        RelationCalibration(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"widths": (16, 32)}, r"widths must be 3 positive integers divisible by 4 .*got \(16, 32\)"),
        ({"widths": (16, 30, 64)}, r"widths must be 3 positive integers divisible by 4 .*got \(16, 30, 64\)"),
        ({"palette_temperature": 0.0}, "palette_temperature must be > 0, got 0.0"),
        ({"max_count": 0}, "max_count must be an integer >= 1, got 0"),
        ({"shapes": ()}, r"shapes must be a non-empty tuple of names, got \(\)"),
        ({"colors": ("red", 1)}, r"colors must be a non-empty tuple of names, got \('red', 1\)"),
    ],
)
def test_classifier_config_refuses_an_architecture_it_cannot_build(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassifierConfig(**kwargs)
