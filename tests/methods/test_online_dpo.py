"""Online Flow-DPO: pairs, the Diffusion-DPO loss on hand-computed values, shared noise, the reference refresh."""

import math

import pytest
import torch

from methods.online_dpo import OnlineDPO, OnlineDPOConfig, dpo_loss, preference_pairs
from tests.methods.forward_smoke import counted, group_prompts


def test_preference_pairs_best_vs_worst_and_the_tie_fallback():
    rewards = torch.tensor([0.2, 0.9, 0.1, 0.5, 0.5, 0.5, 0.3, 0.7])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    winners, losers = preference_pairs(rewards, groups)
    # Group 1 is all-equal: the official fallback makes its second sample the winner over its first.
    assert winners.tolist() == [1, 4, 7] and losers.tolist() == [2, 3, 6]
    winners, losers = preference_pairs(rewards, groups, drop_tied_groups=True)
    assert winners.tolist() == [1, 7] and losers.tolist() == [2, 6]
    with pytest.raises(ValueError, match="at least 2"):
        preference_pairs(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


def test_dpo_loss_hand_computed():
    # Δ = (1.0 − 1.5) − (2.0 − 1.5) = −1; −β/2·Δ = 1 for β = 2 → −log σ(1) = log(1 + e^{−1}).
    one = torch.tensor([1.0])
    loss = dpo_loss(one, 2 * one, 1.5 * one, 1.5 * one, beta=2.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)), rel=1e-6)
    # θ = reference: log 2 whatever β.
    errs = torch.tensor([0.3, 0.8])
    assert dpo_loss(errs, errs.flip(0), errs, errs.flip(0), beta=100.0).item() == pytest.approx(math.log(2.0))
    # Mean over pairs, and the gradient lowers the winner's error and raises the loser's.
    theta_w = torch.tensor([1.0, 0.5], requires_grad=True)
    theta_l = torch.tensor([2.0, 0.5], requires_grad=True)
    ref = torch.tensor([1.5, 0.5])
    loss = dpo_loss(theta_w, theta_l, ref, ref, beta=2.0)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 2, rel=1e-6)
    loss.backward()
    assert (theta_w.grad > 0).all() and (theta_l.grad < 0).all()
    # dL/dℓ_θ(x_w) = (β/2)·σ(β/2·Δ) / P for the first pair: 1·σ(−1)/2.
    assert theta_w.grad[0].item() == pytest.approx(1 / (1 + math.exp(1.0)) / 2, rel=1e-6)


def test_winner_and_loser_share_t_and_noise(tiny_policy):
    method, _ = counted(OnlineDPO, OnlineDPOConfig(num_steps=3), tiny_policy)
    prompts, groups = group_prompts(2, 3)
    rollout = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    x0 = rollout.x0[:2]
    err_w, err_l, ref_w, ref_l = method._pair_errors(x0, x0.clone(), rollout.cond[:2], torch.Generator().manual_seed(3))
    assert torch.equal(err_w, err_l) and torch.equal(ref_w, ref_l)  # same sample twice → identical errors
    assert torch.allclose(err_w.detach(), ref_w)  # θ = reference at the start


def test_update_counts_and_refreshes_the_reference_every_n_steps(tiny_policy):
    cfg = OnlineDPOConfig(num_steps=4, guidance_scale=2.0, ref_update_step=2)
    method, ledger = counted(OnlineDPO, cfg, tiny_policy)
    prompts, groups = group_prompts(2, 3)
    initial = tiny_policy.weight_state("old")
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2])
    draws = int(4 * 0.99)
    for iteration in (1, 2):
        with ledger.phase("sampling"):
            rollout = method.collect(prompts, groups, torch.Generator().manual_seed(iteration))
        with ledger.phase("training"):
            logs = method.update(rollout, rewards, torch.Generator().manual_seed(10 + iteration))
        # Per pair and draw: θ on (x_w, x_l) with grad and the reference on both without.
        assert ledger.forward["training"] == iteration * 2 * draws * (2 + 2)
        assert ledger.backward["training"] == iteration * 2 * draws * 2
        assert logs["train/pairs"] == 2.0
        assert logs["train/reward_margin"] == pytest.approx(((0.9 - 0.1) + (0.8 - 0.2)) / 2)
        old, theta = tiny_policy.weight_state("old"), tiny_policy.weight_state("train")
        if iteration == 1:
            assert logs["train/reference_refreshed"] == 0.0
            assert all(torch.equal(initial[k], old[k]) for k in old)
            assert logs["train/loss"] == pytest.approx(math.log(2.0), abs=1e-6)  # θ = old during the first step
        else:
            assert logs["train/reference_refreshed"] == 1.0
            assert all(torch.equal(theta[k], old[k]) for k in old)
    assert ledger.forward["sampling"] == 2 * 6 * 4 * 2  # CFG doubles the collection batch


def test_frozen_reference_option_and_all_tied_groups(tiny_policy):
    method, _ = counted(OnlineDPO, OnlineDPOConfig(num_steps=3, reference="ref", drop_tied_groups=True), tiny_policy)
    prompts, groups = group_prompts(2, 3)
    rollout = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    logs = method.update(rollout, torch.full((6,), 0.5), torch.Generator().manual_seed(1))
    assert logs == {"train/pairs": 0.0, "train/skipped": 1.0}
    with pytest.raises(ValueError, match="reference"):
        counted(OnlineDPO, OnlineDPOConfig(reference="base"), tiny_policy)  # type: ignore[arg-type]
