"""FlowGRPO-Fast: the window draw, ODE outside the window, on-policy ratio 1, the meter's counts, the loop."""

import dataclasses
import math

import pytest
import torch

from harness.rollout import rollout
from harness.samplers import CPS, EulerODE
from methods.flow_grpo import gaussian_kl_mean
from methods.flow_grpo_fast import (
    NOCFG_RECIPE,
    WITH_CFG,
    FlowGRPOFast,
    FlowGRPOFastConfig,
    draw_window_start,
)
from tests.methods.forward_smoke import counted, group_prompts, loop_smoke


def test_window_start_is_uniform_over_the_official_range():
    g = torch.Generator().manual_seed(0)
    starts = [draw_window_start(10, 3, (0, 5), g) for _ in range(200)]
    assert set(starts) == {0, 1, 2}  # start ∈ [lo, hi − w] inclusive
    assert all(s == 4 for s in (draw_window_start(10, 1, (4, 5), g) for _ in range(5)))
    for size, window in ((0, (0, 5)), (3, (0, 2)), (3, (8, 11)), (2, (-1, 3))):
        with pytest.raises(ValueError):
            draw_window_start(10, size, window, g)


def test_cps_window_step_hand_computed():
    # One element: x = 1, v = 2, t = 0.5 → 0.4, η = 0.8: s = 0.4·sin(0.4π),
    # x̂0 = x − t·v = 0, x̂1 = x + (1 − t)·v = 2, μ = 0.6·0 + sqrt(0.16 − s²)·2.
    x, v = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    s = 0.4 * math.sin(0.4 * math.pi)
    mu = 2 * math.sqrt(0.16 - s**2)
    x_next = torch.tensor([[mu + 0.3]])
    cps = CPS(0.8)
    step = cps.step(v, x, torch.tensor(0.5), torch.tensor(0.4))
    log_prob, mean, sigma = cps.log_prob(x_next, step), step.mean, step.sigma
    assert mean.item() == pytest.approx(mu, rel=1e-6) and sigma.item() == pytest.approx(s, rel=1e-6)
    assert log_prob.item() == pytest.approx(-(0.3**2), rel=1e-5)  # official: −mean((x' − μ)²), no 1/(2s²)
    with pytest.raises(ValueError, match="sde_type"):
        FlowGRPOFastConfig(sde_type="dance")
    # The KL uses σ = s for CPS: with a reference velocity 1, μ_ref = 0.6·1 + sqrt(0.16 − s²)·1.5, so
    # KL = (μ − μ_ref)²/(2s²) (one dim, FlowGRPO's gaussian_kl_mean).
    reference = cps.step(torch.tensor([[1.0]]), x, torch.tensor(0.5), torch.tensor(0.4))
    mean_ref, sigma_ref = reference.mean, reference.sigma
    mu_ref = 0.6 * 0.5 + math.sqrt(0.16 - s**2) * 1.5
    assert mean_ref.item() == pytest.approx(mu_ref, rel=1e-6) and sigma_ref.item() == pytest.approx(s, rel=1e-6)
    kl = gaussian_kl_mean(mean, mean_ref, sigma)
    assert kl.item() == pytest.approx((mu - mu_ref) ** 2 / (2 * s**2), rel=1e-5)


@pytest.mark.parametrize("preset", [NOCFG_RECIPE, WITH_CFG], ids=["nocfg", "with_cfg"])
def test_ode_outside_the_window_and_only_the_window_is_stored(tiny_policy, preset):
    cfg = dataclasses.replace(preset, num_steps=6, sde_window_size=2, sde_window_range=(1, 5))
    method, ledger = counted(FlowGRPOFast, cfg, tiny_policy)
    prompts, groups = group_prompts(2, 3)
    with ledger.phase("sampling"):
        out = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    cfg_factor = 2 if cfg.rollout_cfg != 1.0 else 1
    assert ledger.forward["sampling"] == 6 * 6 * cfg_factor
    traj = out.trajectory
    start = int((method.schedule == traj.timesteps[0, 0]).nonzero()[0])  # one sampling call: one window
    assert 1 <= start <= 3 and traj.latents.shape[1] == 3 and traj.log_probs.shape == (6, 2)
    assert torch.equal(traj.timesteps, method.schedule[start : start + 3].expand(6, -1))
    # Before the window: the Euler ODE from the same initial noise (the first draw of the generator).
    noise = torch.randn((6, *tiny_policy.sample_shape), generator=torch.Generator().manual_seed(0))
    uncond = tiny_policy.encode([""] * 6) if cfg_factor == 2 else None
    head = rollout(tiny_policy, EulerODE(), out.cond, noise, method.schedule[: start + 1],
                   guidance_scale=cfg.rollout_cfg, uncond=uncond).x0  # fmt: skip
    assert torch.allclose(traj.latents[:, 0], head, atol=1e-6)
    # After it: the Euler ODE from the window's last latent to x0.
    tail = rollout(tiny_policy, EulerODE(), out.cond, traj.latents[:, -1], method.schedule[start + 2 :],
                   guidance_scale=cfg.rollout_cfg, uncond=uncond).x0  # fmt: skip
    assert torch.allclose(out.x0, tail, atol=1e-6)
    # Inside it the steps are stochastic: not the ODE.
    ode_step = rollout(tiny_policy, EulerODE(), out.cond, traj.latents[:, 0], traj.timesteps[0, :2],
                       guidance_scale=cfg.rollout_cfg, uncond=uncond).x0  # fmt: skip
    assert not torch.allclose(traj.latents[:, 1], ode_step, atol=1e-3)


@pytest.mark.parametrize("preset", [NOCFG_RECIPE, WITH_CFG], ids=["nocfg", "with_cfg"])
def test_update_is_on_policy_and_trains_only_the_window(tiny_policy, preset):
    # One optimizer step, so that every ratio is 1 (the second of the official two steps moves θ).
    cfg = dataclasses.replace(preset, num_steps=6, sde_window_size=2, sde_window_range=(0, 4),
                              optimizer_steps_per_iteration=1)  # fmt: skip
    method, ledger = counted(FlowGRPOFast, cfg, tiny_policy)
    prompts, groups = group_prompts(2, 3)
    out = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    with ledger.phase("training"):
        logs = method.update(out, torch.tensor([0.1, 0.5, 0.9, 0.2, 0.4, 0.3]), torch.Generator().manual_seed(1))
    cfg_factor = 2 if cfg.train_cfg != 1.0 else 1
    ref_factor = cfg_factor if cfg.kl_coef > 0 else 0
    assert ledger.forward["training"] == 6 * 2 * (cfg_factor + ref_factor)
    assert ledger.backward["training"] == 6 * 2 * cfg_factor
    assert logs["train/approx_kl"] < 1e-12 and logs["train/clipfrac"] == 0.0  # ratio 1 on-policy
    assert logs["train/zero_std_ratio"] == 0.0 and "train/grad_norm" in logs


def test_all_equal_rewards_refill_as_the_fast_script_or_skip_with_the_group_rule(tiny_policy):
    """``train_sd3_fast.py`` refills an empty mask to ``filter_multiple`` samples (they train with A = 0)."""
    cfg = FlowGRPOFastConfig(num_steps=6, sde_window_range=(0, 4))
    assert cfg == dataclasses.replace(NOCFG_RECIPE, num_steps=6, sde_window_range=(0, 4))
    assert NOCFG_RECIPE.optimizer_steps_per_iteration == 2 and NOCFG_RECIPE.ema_updates_per_step == 2
    method, ledger = counted(FlowGRPOFast, cfg, tiny_policy)
    prompts, groups = group_prompts(2, 3)
    out = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    with ledger.phase("training"):
        logs = method.update(out, torch.full((6,), 0.5), torch.Generator().manual_seed(1))
    assert "train/skipped" not in logs and logs["train/zero_std_ratio"] == 1.0
    assert ledger.forward["training"] == 4 * 3  # 4 refilled samples × the window's 3 steps (no KL)
    method, ledger = counted(FlowGRPOFast, dataclasses.replace(cfg, sample_filter="zero_std_groups"), tiny_policy)
    with ledger.phase("training"):
        logs = method.update(out, torch.full((6,), 0.5), torch.Generator().manual_seed(1))
    assert logs["train/skipped"] == 1.0 and ledger.forward["training"] == 0


def test_each_sampling_call_draws_its_own_window_and_update_uses_per_sample_times(tiny_policy):
    # 6 images in sampling calls of train_batch_size = 2: three windows, one per call.
    cfg = FlowGRPOFastConfig(num_steps=6, sde_window_size=2, sde_window_range=(0, 5), train_batch_size=2,
                             optimizer_steps_per_iteration=1)  # fmt: skip
    method, ledger = counted(FlowGRPOFast, cfg, tiny_policy)
    prompts, groups = group_prompts(2, 3)
    seen_mixed = False
    for seed in range(4):
        with ledger.phase("sampling"):
            out = method.collect(prompts, groups, torch.Generator().manual_seed(seed))
        times = out.trajectory.timesteps
        assert times.shape == (6, 3)
        calls = [times[i : i + 2] for i in range(0, 6, 2)]
        assert all(torch.equal(c[0], c[1]) for c in calls)  # one window per call
        for row in times:  # each row is a window of the schedule
            start = int((method.schedule == row[0]).nonzero()[0])
            assert 0 <= start <= 3 and torch.equal(row, method.schedule[start : start + 3])
        seen_mixed |= len({float(c[0, 0]) for c in calls}) > 1
    assert seen_mixed, "windows never differed between sampling calls"
    assert ledger.forward["sampling"] == 4 * 6 * 6
    with ledger.phase("training"):
        logs = method.update(out, torch.tensor([0.1, 0.5, 0.9, 0.2, 0.4, 0.3]), torch.Generator().manual_seed(1))
    assert logs["train/approx_kl"] < 1e-12 and logs["train/clipfrac"] == 0.0  # on-policy with mixed windows
    starts = [int((method.schedule == row[0]).nonzero()[0]) for row in out.trajectory.timesteps]
    assert logs["train/window_start"] == pytest.approx(sum(starts) / 6)


def test_two_iterations_through_the_loop_with_cfg(tiny_policy):
    cfg = dataclasses.replace(WITH_CFG, num_steps=4, sde_window_range=(0, 3), rollout_cfg=2.0, train_cfg=2.0)
    loop_smoke("flow_grpo_fast", cfg, tiny_policy)
