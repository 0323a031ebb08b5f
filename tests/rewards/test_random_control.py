"""The random control reward: prompt-blind, at its rate, deterministic per image."""

import pytest
import torch

from harness.types import Prompt
from rewards import REWARDS
from rewards.random_control import RandomControl


def test_scores_images_at_its_rate_whatever_the_prompt():
    images = torch.rand(4000, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    reward = RandomControl(p=0.2)
    first = reward(images, [Prompt("a photo of a circle")] * len(images))
    assert set(first.tolist()) <= {0.0, 1.0}
    assert 0.18 < first.mean().item() < 0.22
    assert torch.equal(first, reward(images, [Prompt("two squares")] * len(images)))  # blind to the prompt
    assert torch.equal(first[:7], RandomControl(p=0.2)(images[:7], [Prompt("")] * 7))  # per image, no state


def test_checks_its_rate_and_is_registered():
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\)"):
        RandomControl(p=1.0)
    assert REWARDS.get("random_control") is RandomControl
