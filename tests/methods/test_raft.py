"""RAFT: top-k selection under both tie rules, the official preset and loss, the kept samples, the refresh."""

import dataclasses

import pytest
import torch

from methods.raft import ONLINE_SFT, RAFT, RAFTConfig, top_k_mask
from tests.conftest import make_tiny_policy
from tests.methods.forward_smoke import counted, group_prompts


def test_top_k_mask_exact_k_per_group_with_stable_ties():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.2])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = top_k_mask(rewards, groups, 1, "exact_k")
    assert mask.tolist() == [False, True, False, True, False, False]  # tie: the first wins (RAFT keeps k)
    assert top_k_mask(rewards, groups, 2, "exact_k").tolist() == [False, True, True, True, True, False]
    assert top_k_mask(rewards, groups, 5, "exact_k").all()  # k ≥ group size keeps everything
    # Groups need not be contiguous.
    got = top_k_mask(torch.tensor([1.0, 5.0, 2.0, 0.0]), torch.tensor([7, 3, 7, 3]), 1, "exact_k")
    assert got.tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="top_k"):
        top_k_mask(rewards, groups, 0)
    with pytest.raises(ValueError, match="must both be"):
        top_k_mask(rewards, groups[:3], 1)
    with pytest.raises(ValueError, match="ties"):
        top_k_mask(rewards, groups, 1, "random")  # type: ignore[arg-type]


def test_top_k_mask_all_tied_is_flowgrpo_sft():
    rewards = torch.tensor([0.1, 0.9, 0.9, 0.3, 0.3, 0.2, 0.5, 0.5, 0.5])
    groups = torch.arange(3).repeat_interleave(3)
    # Official "sft": rewards == group max, so every tied maximum is kept and an all-equal group is kept whole.
    official = torch.cat([(rewards[m] == rewards[m].max()) for m in (slice(0, 3), slice(3, 6), slice(6, 9))])
    assert top_k_mask(rewards, groups, 1).tolist() == official.tolist()
    assert top_k_mask(rewards, groups, 1).tolist() == [False, True, True, True, True, False, True, True, True]
    # k = 2: everything at least as good as the second best.
    assert top_k_mask(rewards, groups, 2, "all_tied").tolist() == [False, True, True, True, True, False] + [True] * 3
    assert RAFTConfig().ties == "all_tied"  # the official code's rule is the default


def test_online_sft_preset_is_the_notes_official_setup():
    assert ONLINE_SFT.sampler == "flow_sde" and ONLINE_SFT.noise_level == 0.7
    assert ONLINE_SFT.num_steps == 40 and ONLINE_SFT.guidance_scale == 4.5
    assert ONLINE_SFT.sample_refresh_interval == 40 and ONLINE_SFT.ties == "all_tied" and ONLINE_SFT.top_k == 1


def test_update_trains_only_the_kept_samples_and_refreshes_the_sampler(tiny_policy):
    method, ledger = counted(RAFT, RAFTConfig(num_steps=4), tiny_policy)
    prompts, groups = group_prompts(2, 3)
    with ledger.phase("sampling"):
        rollout = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    assert ledger.forward["sampling"] == 6 * 4  # 6 images × 4 dpm2 steps, no CFG
    with ledger.phase("training"):
        logs = method.update(rollout, torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2]), torch.Generator().manual_seed(1))
    draws = int(4 * 0.99)
    assert ledger.forward["training"] == ledger.backward["training"] == 2 * draws  # one kept sample per group
    assert logs["train/kept_reward_mean"] == pytest.approx((0.9 + 0.8) / 2)
    assert logs["train/kept_fraction"] == pytest.approx(2 / 6)
    assert logs["train/sampler_refreshed"] == 1.0
    theta, old = tiny_policy.weight_state("train"), tiny_policy.weight_state("old")
    assert all(torch.equal(theta[k], old[k]) for k in theta)  # interval 1: sample with the latest θ


def test_sampler_refresh_interval(tiny_policy):
    method, _ = counted(RAFT, RAFTConfig(num_steps=3, sample_refresh_interval=2), tiny_policy)
    prompts, groups = group_prompts(2, 3)
    initial = tiny_policy.weight_state("old")
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2])
    for iteration in (1, 2):
        rollout = method.collect(prompts, groups, torch.Generator().manual_seed(iteration))
        logs = method.update(rollout, rewards, torch.Generator().manual_seed(10 + iteration))
        old, theta = tiny_policy.weight_state("old"), tiny_policy.weight_state("train")
        if iteration == 1:
            assert logs["train/sampler_refreshed"] == 0.0
            assert all(torch.equal(initial[k], old[k]) for k in old)
        else:
            assert logs["train/sampler_refreshed"] == 1.0
            assert all(torch.equal(theta[k], old[k]) for k in old)


def first_step_gradient(cfg: RAFTConfig, rollout, rewards) -> list[torch.Tensor]:
    """The gradient RAFT's first optimizer step applies, on a fresh copy of the same tiny policy."""
    method, _ = counted(RAFT, cfg, make_tiny_policy())
    grads: list[list[torch.Tensor]] = []
    step = method.core.optim.step

    def recording_step() -> float:
        grads.append([p.grad.clone() for p in method.core.optim.parameters])
        return step()

    method.core.optim.step = recording_step
    method.update(rollout, rewards, torch.Generator().manual_seed(1))
    return grads[0]


def test_official_loss_is_the_mean_over_all_samples():
    """Official ``mean(adv·ℓ)`` over all B samples, adv ∈ {0, 1}: the kept-only mean's gradient times kept/B."""
    assert RAFTConfig().loss_mean == "all_samples"
    prompts, groups = group_prompts(2, 3)
    cfg = RAFTConfig(num_steps=3)
    method, _ = counted(RAFT, cfg, make_tiny_policy())
    rollout = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2])  # one kept per group: kept/B = 2/6
    official = first_step_gradient(cfg, rollout, rewards)
    kept_mean = first_step_gradient(dataclasses.replace(cfg, loss_mean="kept"), rollout, rewards)
    for got, reference in zip(official, kept_mean, strict=True):
        assert torch.allclose(got, reference * 2 / 6, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in official)
