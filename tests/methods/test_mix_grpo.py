"""MixGRPO (+ Flash): the official sliding window, Flash's schedule and solvers, the loss, counts, the loop."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from harness.rollout import Window
from harness.samplers import DPMSolverPP2M, EulerODE, FlowSDE, History
from methods.flow_grpo import grpo_loss
from methods.mix_grpo import (
    FLASH,
    FLASH_STAR,
    MixGRPO,
    MixGRPOConfig,
    flash_schedule,
    mix_grpo_loss,
    window_start,
    window_steps,
)
from tests.methods.forward_smoke import counted, group_prompts, loop_smoke

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("run", range(3))
def test_window_follows_the_official_progressive_states(run):
    """Fixture: ``GRPOTrainingStates`` (progressive, overlap, roll-back) read then advanced once per iteration."""
    official = json.loads((FIXTURES / "mix_grpo_windows_official.json").read_text())["runs"][run]
    changes = dict((i, w) for i, w in official["changes"])
    expected: list[int] = []
    for iteration in range(official["iterations"]):
        expected = changes.get(iteration, expected)
        max_start = official["sampling_steps"] - 2
        start = window_start(iteration, shift_interval=official["iters_per_group"],
                             stride=official["prog_overlap_step"], max_start=max_start, roll_back=True)  # fmt: skip
        assert list(window_steps(start, official["group_size"], max_start)) == expected, iteration


def test_window_start_without_roll_back_stays_at_the_bound():
    starts = [window_start(i, shift_interval=2, stride=3, max_start=7, roll_back=False) for i in range(10)]
    assert starts == [0, 0, 3, 3, 6, 6, 7, 7, 7, 7]
    assert [window_start(i, shift_interval=1, stride=0, max_start=7, roll_back=True) for i in range(3)] == [0, 0, 0]


@pytest.mark.parametrize("run", range(3))
def test_flash_schedule_and_solvers_match_the_official_rollout(run):
    """Fixture: the official ``run_sample_step`` (DPM-Solver++ "post", order 2 midpoint, Flow-SDE in the window) with
    v = 0.5·z − 0.3. Replayed step by step: the compressed schedule, Euler before the window, the Flow-SDE's
    log-probs inside it, DPM-Solver++(2M) after it (second order from the window's last x̂0)."""
    official = torch.load(FIXTURES / "mix_grpo_flash_official.pt")["runs"][run]
    window_list = official["window"]
    schedule = flash_schedule(
        official["sampling_steps"], official["shift"], window_list[-1], official["compress_ratio"]
    )
    assert torch.allclose(schedule, official["schedule"], atol=1e-6)
    latents, log_probs = official["latents"], official["log_probs"]
    assert latents.shape[1] == len(schedule) and torch.equal(latents[:, 0], official["noise"])
    window = Window(window_list[0], len(window_list), outside=EulerODE(), after=DPMSolverPP2M())
    inside, history = FlowSDE(official["eta"]), None
    for k in range(len(schedule) - 1):
        x, t, t_next = latents[:, k], schedule[k], schedule[k + 1]
        sampler = window.sampler_at(k, inside)
        step = sampler.step(0.5 * x - 0.3, x, t, t_next, history=history)
        if sampler.stochastic:
            assert torch.allclose(sampler.log_prob(latents[:, k + 1], step), log_probs[:, k], atol=1e-5), k
        else:
            assert torch.allclose(step.x_next, latents[:, k + 1], atol=1e-5), (k, sampler.name)
        history = History(step.x0_pred, t)
    assert torch.allclose(latents[:, -1], official["x0"])


def test_loss_identities_hand_computed():
    adv = torch.tensor([1.0, -1.0])
    old = torch.tensor([-0.5, 0.3])
    log_prob = (old + torch.tensor([0.2, -0.2])).requires_grad_(True)
    assert torch.equal(mix_grpo_loss(log_prob, old, adv, clip_range=0.5), grpo_loss(log_prob, old, adv, clip_range=0.5))
    # kl term: 0.5·mean(Δ²) = 0.5·0.04 = 0.02 per unit of kl_coef.
    with_kl = mix_grpo_loss(log_prob, old, adv, clip_range=0.5, kl_coef=2.0)
    assert with_kl.item() == pytest.approx(grpo_loss(log_prob, old, adv, clip_range=0.5).item() + 0.04, rel=1e-5)
    # At ρ = 1 the KL term and its gradient vanish: the gradient is the policy gradient −A/B.
    on_policy = old.clone().requires_grad_(True)
    mix_grpo_loss(on_policy, old, adv, clip_range=1e-4, kl_coef=5.0).backward()
    assert torch.allclose(on_policy.grad, -adv / 2)


def test_presets_and_defaults():
    cfg = MixGRPOConfig()
    assert (cfg.num_steps, cfg.window_size, cfg.shift_interval, cfg.window_stride, cfg.noise_level) == (
        25,
        4,
        25,
        1,
        0.7,
    )
    assert cfg.sde_type == "flow_sde" and cfg.post_solver == "euler" and cfg.kl_coef == 0.0 and cfg.roll_back
    assert FLASH.post_solver == "dpm2" and FLASH.shift_interval == 20 and FLASH.post_compress_ratio == 0.4
    assert FLASH_STAR.window_stride == 0 and FLASH_STAR.post_compress_ratio == 0.2
    with pytest.raises(ValueError, match="post_compress_ratio"):
        MixGRPOConfig(post_compress_ratio=1.5)


def test_the_window_slides_and_only_it_is_sampled_stochastically_and_trained(tiny_policy):
    cfg = MixGRPOConfig(num_steps=6, window_size=2, shift_interval=1, optimizer_steps_per_iteration=1)
    method, ledger = counted(MixGRPO, cfg, tiny_policy)
    prompts, groups = group_prompts(2, 3)
    rewards = torch.tensor([0.1, 0.5, 0.9, 0.2, 0.4, 0.3])
    for iteration in range(2):
        with ledger.phase("sampling"):
            out = method.collect(prompts, groups, torch.Generator().manual_seed(iteration))
        traj = out.trajectory
        assert torch.equal(traj.timesteps, method.schedule[iteration : iteration + 3])  # window [i, i + 2)
        assert traj.latents.shape[1] == 3 and traj.log_probs.shape == (6, 2)
        # One noise per prompt and the ODE before the window: a group's images differ only from the window on.
        assert torch.equal(traj.latents[0, 0], traj.latents[1, 0]) and not torch.equal(
            traj.latents[0, 1], traj.latents[1, 1]
        )
        with ledger.phase("training"):
            logs = method.update(out, rewards, torch.Generator().manual_seed(1))
        assert logs["train/window_start"] == iteration and logs["train/approx_kl"] < 1e-12
    assert ledger.forward["sampling"] == 2 * 6 * 6
    assert ledger.forward["training"] == ledger.backward["training"] == 2 * 6 * 2
    assert method.state_dict() == {"iteration": 2}
    method.load_state_dict({"iteration": 0})
    assert list(method.current_window()) == [0, 1]


def test_an_empty_window_samples_the_ode_and_skips(tiny_policy):
    # T = 4: the window holds steps below 2; with w = 1 and τ = 1 the starts are 0, 1, 2 (empty), 0, …
    method, ledger = counted(MixGRPO, MixGRPOConfig(num_steps=4, window_size=1, shift_interval=1), tiny_policy)
    prompts, groups = group_prompts(2, 3)
    for _ in range(2):
        method.collect(prompts, groups, torch.Generator().manual_seed(0))
    with ledger.phase("sampling"):
        out = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    assert out.trajectory is None and ledger.forward["sampling"] == 6 * 4
    with ledger.phase("training"):
        assert method.update(out, torch.rand(6), torch.Generator())["train/skipped"] == 1.0
    assert ledger.forward["training"] == 0 and list(method.current_window()) == [0]


def test_flash_samples_the_compressed_schedule(tiny_policy):
    cfg = dataclasses.replace(FLASH, num_steps=10, window_size=2)
    method, ledger = counted(MixGRPO, cfg, tiny_policy)
    prompts, groups = group_prompts(2, 3)
    with ledger.phase("sampling"):
        out = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    schedule = flash_schedule(10, cfg.shift, 1, 0.4)  # window [0, 2): last = 1; n = int(9·0.4) = 3 tail points
    assert len(schedule) == 2 + 3 and schedule[-1] == 0.0
    assert ledger.forward["sampling"] == 6 * (len(schedule) - 1)
    assert torch.equal(out.trajectory.timesteps, schedule[:3])


@pytest.mark.parametrize("preset", [MixGRPOConfig(), FLASH], ids=["mix", "flash"])
def test_two_iterations_through_the_loop(tiny_policy, preset):
    loop_smoke("mix_grpo", dataclasses.replace(preset, num_steps=6), tiny_policy)
