"""Per-reward normalisation and its use in WeightedReward."""

from __future__ import annotations

import math

import pytest
import torch

from harness.types import Prompt, RewardSpec
from rewards.base import WeightedReward
from rewards.normalize import FixedRange, RunningMeanStd


class Scores:
    """Returns fixed scores; differentiable in the images when asked (sum of pixels added with weight 0+)."""

    def __init__(self, values: list[float], value_range: tuple[float, float] = (0.0, 1.0)) -> None:
        self.values = torch.tensor(values)
        self.spec = RewardSpec(name="s", version="1", description="fixed", value_range=value_range, differentiable=True)

    def __call__(self, images, prompts):
        return self.values + 0.5 * images.flatten(1).mean(1)


def test_fixed_range_maps_low_high_to_zero_one_and_clips():
    n = FixedRange(0.2, 0.4)
    torch.testing.assert_close(n(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    raw = FixedRange(0.2, 0.4, clip=False)
    torch.testing.assert_close(raw(torch.tensor([0.1, 0.5])), torch.tensor([-0.5, 1.5]))
    assert n.output_range((-1.0, 1.0)) == (0.0, 1.0) and raw.output_range((0.0, 1.0)) == pytest.approx((-1.0, 4.0))
    with pytest.raises(ValueError, match="high > low"):
        FixedRange(1.0, 1.0)


def test_running_mean_std_uses_all_scores_seen_including_this_batch():
    n = RunningMeanStd(eps=1e-6)
    n(torch.tensor([1.0, 2.0, 3.0]))
    out = n(torch.tensor([4.0, 5.0]))  # statistics over 1..5: mean 3, population std sqrt(2)
    assert n.count == 5 and n.mean == pytest.approx(3.0) and n.std == pytest.approx(math.sqrt(2))
    torch.testing.assert_close(out, (torch.tensor([4.0, 5.0]) - 3) / (math.sqrt(2) + 1e-6))
    n.update = False
    n(torch.tensor([100.0]))
    assert n.count == 5  # frozen
    with pytest.raises(ValueError, match="has seen no scores"):
        RunningMeanStd(update=False)(torch.tensor([1.0]))


def test_weighted_reward_normalizes_before_weighting_and_keeps_raw_components():
    images = torch.zeros(2, 3, 4, 4)
    a, b = Scores([0.25, 0.35]), Scores([5.0, 6.0], value_range=(1.0, 10.0))
    combined = WeightedReward({"a": a, "b": b}, {"a": 1.0, "b": 2.0}, {"a": FixedRange(0.2, 0.4)})
    scores = combined(images, [Prompt("x")] * 2)
    torch.testing.assert_close(scores, torch.tensor([0.25 + 10.0, 0.75 + 12.0]))
    torch.testing.assert_close(combined.last_components["a"], torch.tensor([0.25, 0.35]))
    torch.testing.assert_close(combined.last_normalized["a"], torch.tensor([0.25, 0.75]))
    assert combined.spec.name == "1*a[range(0.2,0.4)]+2*b"
    assert combined.spec.value_range == (0.0 + 2.0, 1.0 + 20.0)
    with pytest.raises(ValueError, match="name rewards not in"):
        WeightedReward({"a": a}, {"a": 1.0}, {"c": FixedRange(0, 1)})


def test_normalized_sum_stays_differentiable():
    images = torch.full((2, 3, 4, 4), 0.5, requires_grad=True)
    combined = WeightedReward(
        {"a": Scores([0.0, 1.0]), "b": Scores([2.0, 4.0])}, {"a": 1.0, "b": 1.0}, {"b": RunningMeanStd()}
    )
    assert combined.spec.differentiable
    combined(images, [Prompt("x")] * 2).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
