"""Flow-RWR: raw (official) and group-softmax (paper) weights on hand-computed values, the preset, the update."""

import math

import pytest
import torch

from methods.rwr import FLOW_RWR, RWR, RWRConfig, group_softmax_weights, rwr_weights
from tests.methods.forward_smoke import counted, group_prompts


def test_group_softmax_weights_hand_computed():
    # Group 0, τ = 0.5: exp(r/τ) = (1, 3) → softmax (1/4, 3/4) → ×G=2 → (0.5, 1.5).
    # Group 1: equal rewards → (1, 1, 1).
    rewards = torch.tensor([0.0, 0.5 * math.log(3.0), 0.7, 0.7, 0.7])
    groups = torch.tensor([0, 0, 1, 1, 1])
    weights = group_softmax_weights(rewards, groups, temperature=0.5)
    assert torch.allclose(weights, torch.tensor([0.5, 1.5, 1.0, 1.0, 1.0]), atol=1e-6)
    # Large τ: uniform; small τ: all the group's mass (G) on its best sample.
    r = torch.tensor([0.2, 0.9, 0.4])
    g = torch.zeros(3, dtype=torch.long)
    assert torch.allclose(group_softmax_weights(r, g, 1e6), torch.ones(3), atol=1e-5)
    assert torch.allclose(group_softmax_weights(r, g, 1e-3), torch.tensor([0.0, 3.0, 0.0]), atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        group_softmax_weights(r, g, 0.0)


def test_raw_weights_are_the_rewards_and_refuse_negative_ones():
    rewards, groups = torch.tensor([0.2, 0.9, 0.0, 1.0]), torch.tensor([0, 0, 1, 1])
    assert torch.equal(rwr_weights(rewards, groups, "raw", 0.1), rewards)  # official tracker type "rwr"
    softmax = rwr_weights(rewards, groups, "softmax", 0.1)
    assert torch.allclose(softmax, group_softmax_weights(rewards, groups, 0.1))
    with pytest.raises(ValueError, match="rewards >= 0"):
        rwr_weights(torch.tensor([0.5, -0.1]), torch.tensor([0, 0]), "raw", 1.0)
    with pytest.raises(ValueError, match="weights must be"):
        rwr_weights(rewards, groups, "exp", 1.0)  # type: ignore[arg-type]


def test_defaults_and_the_official_preset():
    cfg = RWRConfig()
    assert cfg.weights == "raw" and cfg.temperature == 0.1
    assert FLOW_RWR.sampler == "flow_sde" and FLOW_RWR.noise_level == 0.7 and FLOW_RWR.num_steps == 40
    assert FLOW_RWR.guidance_scale == 4.5 and FLOW_RWR.sample_refresh_interval == 40


@pytest.mark.parametrize("weights", ["raw", "softmax"])
def test_update_trains_every_sample_and_logs_the_weights(tiny_policy, weights):
    method, ledger = counted(RWR, RWRConfig(num_steps=4, weights=weights, temperature=0.1), tiny_policy)
    prompts, groups = group_prompts(2, 3)
    rollout = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2])
    with ledger.phase("training"):
        logs = method.update(rollout, rewards, torch.Generator().manual_seed(1))
    assert ledger.forward["training"] == ledger.backward["training"] == 6 * int(4 * 0.99)
    expected = rwr_weights(rewards, groups, weights, 0.1)
    assert logs["train/weight_max"] == pytest.approx(expected.max().item())
    assert 1 / 6 < logs["train/weight_ess"] < 1.0
    assert logs["train/sampler_refreshed"] == 1.0
