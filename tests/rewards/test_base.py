"""Reward combination and output checks; the shapes reward on real renders."""

import numpy as np
import pytest
import torch

from harness.shapes_world.render import render
from harness.shapes_world.world import make_metadata
from harness.types import Prompt, RewardError, RewardSpec, check_scores
from rewards import REWARDS
from rewards.base import WeightedReward


class Constant:
    def __init__(self, value: float, name: str = "const") -> None:
        self.value = value
        self.spec = RewardSpec(name=name, version="1", description="constant")

    def __call__(self, images, prompts):
        return torch.full((images.shape[0],), self.value)


def test_weighted_sum_of_raw_scores():
    combined = WeightedReward({"a": Constant(0.5), "b": Constant(2.0)}, {"a": 1.0, "b": 0.25})
    scores = combined(torch.zeros(3, 3, 4, 4), [Prompt("x")] * 3)
    assert torch.allclose(scores, torch.full((3,), 1.0))
    assert torch.equal(combined.last_components["b"], torch.full((3,), 2.0))
    assert combined.spec.name == "1*a+0.25*b"
    with pytest.raises(ValueError, match="must name the same rewards"):
        WeightedReward({"a": Constant(0.5)}, {"b": 1.0})


def test_nan_or_wrong_shape_is_an_error_not_zero():
    with pytest.raises(RewardError, match="non-finite scores at batch positions \\[1\\]"):
        check_scores("r", torch.tensor([0.1, float("nan")]), 2)
    with pytest.raises(RewardError, match="shape \\(3,\\), expected \\(2,\\)"):
        check_scores("r", torch.zeros(3), 2)
    combined = WeightedReward({"nan": Constant(float("nan"))}, {"nan": 1.0})
    with pytest.raises(RewardError):
        combined(torch.zeros(1, 3, 4, 4), [Prompt("x")])


def test_shapes_reward_scores_renders():
    factory = REWARDS.get("shapes_geneval")
    metadata = make_metadata("colors", ("circle",), colors=("red",))
    wrong = make_metadata("colors", ("circle",), colors=("blue",))
    images = torch.from_numpy(np.stack([render(metadata, np.random.default_rng(0))] * 2)).permute(0, 3, 1, 2) / 255
    prompts = [Prompt(metadata["prompt"], metadata), Prompt(wrong["prompt"], wrong)]
    assert factory()(images, prompts).tolist() == [1.0, 0.5]  # count right, colour wrong
    assert factory(judgement="correct")(images, prompts).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="judgement must be"):
        factory(judgement="accuracy")
