"""DanceGRPO: the official advantages, the loss's identities, the rollout, the trained subset, counts, the loop."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from harness.samplers import DanceSDE, EulerODE
from methods.dance_grpo import DanceGRPO, DanceGRPOConfig, dance_advantages, initial_noise, training_transitions
from methods.flow_grpo import grpo_loss
from tests.methods.forward_smoke import counted, group_prompts, loop_smoke

FIXTURE = Path(__file__).parent / "fixtures" / "dance_grpo_official.json"


def test_advantages_match_the_official_code():
    """Fixture: ``train_one_step``'s ``use_group`` advantages (groups of 4; one group tied) run on fixed rewards."""
    official = json.loads(FIXTURE.read_text())["advantages"]
    rewards = torch.tensor(official["rewards"])
    groups = torch.arange(len(rewards)) // official["group_size"]
    assert torch.allclose(dance_advantages(rewards, groups), torch.tensor(official["advantages"]), atol=1e-5)


def test_advantages_hand_computed_with_bessels_std():
    # Group (0, 1): mean 0.5, unbiased std sqrt(0.5) → ±0.5/sqrt(0.5); a tied group gives 0 (no filter).
    got = dance_advantages(torch.tensor([0.0, 1.0, 0.3, 0.3]), torch.tensor([7, 7, 2, 2]))
    a = 0.5 / 0.5**0.5
    assert torch.allclose(got, torch.tensor([-a, a, 0.0, 0.0]), atol=1e-6)
    with pytest.raises(ValueError, match=">= 2 images per prompt"):
        dance_advantages(torch.tensor([0.0, 1.0, 0.3]), torch.tensor([0, 0, 1]))


def test_the_loss_is_grpo_with_its_identities():
    """GRPO: at ρ = 1 the loss is −mean(A) and its gradient the policy gradient −A·∇log p / B; A = 0 → no gradient."""
    log_prob = torch.tensor([-0.3, 0.2, 0.1], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss = grpo_loss(log_prob, log_prob.detach(), adv, clip_range=1e-4)
    assert loss.item() == pytest.approx(0.5 / 3)
    loss.backward()
    assert torch.allclose(log_prob.grad, -adv / 3)
    log_prob.grad = None
    grpo_loss(log_prob, log_prob.detach(), torch.zeros(3), clip_range=1e-4).backward()
    assert log_prob.grad.abs().max() == 0


def test_initial_noise_and_training_transitions():
    groups = torch.tensor([3, 3, 3, 1, 1, 1])
    noise = initial_noise(groups, (2, 4, 4), torch.Generator().manual_seed(0), same_per_group=True)
    assert torch.equal(noise[0], noise[2]) and torch.equal(noise[3], noise[5]) and not torch.equal(noise[0], noise[3])
    assert noise.shape == (6, 2, 4, 4)
    different = initial_noise(groups, (2, 4, 4), torch.Generator().manual_seed(0), same_per_group=False)
    assert not torch.equal(different[0], different[1])
    steps = training_transitions(50, 15, 9, torch.Generator().manual_seed(0))
    assert steps.shape == (50, 9) and steps.min() >= 0 and steps.max() <= 14
    assert all(len(set(row.tolist())) == 9 for row in steps)  # a subset: no transition twice
    assert len({tuple(row.tolist()) for row in steps}) > 1  # drawn per sample
    assert DanceGRPOConfig().trained_transitions == int(15 * 0.6) == 9
    with pytest.raises(ValueError, match="timestep_fraction"):
        DanceGRPOConfig(num_steps=2, timestep_fraction=0.5)


def test_rollout_is_the_dance_sde_then_the_official_last_step(tiny_policy):
    cfg = DanceGRPOConfig(num_steps=5)
    method, ledger = counted(DanceGRPO, cfg, tiny_policy)
    prompts, groups = group_prompts(2, 3)
    with ledger.phase("sampling"):
        out = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    assert ledger.forward["sampling"] == 6 * 5
    traj = out.trajectory
    assert traj.latents.shape[1] == 5 and traj.log_probs.shape == (6, 4)  # T − 1 stochastic transitions
    assert torch.equal(traj.latents[0, 0], traj.latents[2, 0]) and not torch.equal(
        traj.latents[0, 0], traj.latents[3, 0]
    )
    with torch.no_grad():
        sde = DanceSDE(cfg.noise_level)
        x, t = traj.latents[:, 1], method.schedule[1].expand(6)
        step = sde.step(tiny_policy.velocity(x, t, out.cond), x, method.schedule[1], method.schedule[2])
        assert torch.allclose(sde.log_prob(traj.latents[:, 2], step), traj.log_probs[:, 1], atol=1e-6)
        x, t = traj.latents[:, -1], method.schedule[-2].expand(6)  # the image: x̂0 of the last step (Euler to 0)
        last = EulerODE().step(tiny_policy.velocity(x, t, out.cond), x, method.schedule[-2], 0.0)
        assert torch.allclose(out.x0, last.x0_pred, atol=1e-6)


def test_update_is_on_policy_and_trains_the_drawn_subset(tiny_policy):
    cfg = DanceGRPOConfig(num_steps=6, optimizer_steps_per_iteration=1)  # one step: every ratio is 1
    method, ledger = counted(DanceGRPO, cfg, tiny_policy)
    prompts, groups = group_prompts(2, 3)
    out = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    with ledger.phase("training"):
        logs = method.update(out, torch.tensor([0.1, 0.5, 0.9, 0.2, 0.2, 0.2]), torch.Generator().manual_seed(1))
    trained = int(5 * 0.6)
    # θ with grad per (sample, drawn transition), tied group included (A = 0), no reference pass.
    assert ledger.forward["training"] == ledger.backward["training"] == 6 * trained
    assert logs["train/approx_kl"] < 1e-12 and logs["train/clipfrac"] == 0.0 and "train/grad_norm" in logs


def test_two_iterations_through_the_loop(tiny_policy):
    loop_smoke("dance_grpo", dataclasses.replace(DanceGRPOConfig(), num_steps=4), tiny_policy)
