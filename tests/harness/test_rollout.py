"""The one denoising loop, with and without a sampler window."""

import pytest
import torch

from harness.rollout import Window, replay_transition, rollout
from harness.samplers import CPS, DPMSolverPP2M, EulerODE, FlowSDE, History, flow_schedule


def test_a_window_is_the_sde_inside_and_the_euler_ode_outside(tiny_policy):
    cond = tiny_policy.encode(["a red circle", "two blue squares"])
    noise = torch.randn(2, *tiny_policy.sample_shape, generator=torch.Generator().manual_seed(0))
    schedule = flow_schedule(6)
    windowed = rollout(tiny_policy, FlowSDE(0.7), cond, noise, schedule, generator=torch.Generator().manual_seed(1),
                       keep_trajectory=True, window=Window(2, 3))  # fmt: skip
    assert windowed.latents.shape[1] == 4 and windowed.log_probs.shape == (2, 3)
    assert torch.equal(windowed.timesteps, schedule[2:6])
    # The same trajectory, composed by hand: Euler, then the window's SDE steps with the same draws, then Euler.
    ode = rollout(tiny_policy, EulerODE(), cond, noise, schedule[:3], keep_trajectory=True)
    assert torch.equal(windowed.latents[:, 0], ode.x0)
    sde = rollout(tiny_policy, FlowSDE(0.7), cond, ode.x0, schedule[2:6], generator=torch.Generator().manual_seed(1),
                  keep_trajectory=True)  # fmt: skip
    assert torch.equal(windowed.latents, sde.latents) and torch.equal(windowed.log_probs, sde.log_probs)
    tail = rollout(tiny_policy, EulerODE(), cond, sde.x0, schedule[5:])
    assert torch.equal(windowed.x0, tail.x0)


def test_a_window_with_another_solver_after_it(tiny_policy):
    """MixGRPO-Flash: Euler before the window, the SDE inside, DPM-Solver++(2M) after it (with the window's history)."""
    cond = tiny_policy.encode(["a red circle", "two blue squares"])
    noise = torch.randn(2, *tiny_policy.sample_shape, generator=torch.Generator().manual_seed(0))
    schedule = flow_schedule(7)
    window = Window(2, 2, outside=EulerODE(), after=DPMSolverPP2M())
    assert [type(window.sampler_at(k, FlowSDE(0.7))).__name__ for k in range(7)] == (
        ["EulerODE"] * 2 + ["FlowSDE"] * 2 + ["DPMSolverPP2M"] * 3
    )
    got = rollout(tiny_policy, FlowSDE(0.7), cond, noise, schedule, generator=torch.Generator().manual_seed(1),
                  keep_trajectory=True, window=window)  # fmt: skip
    head = rollout(tiny_policy, EulerODE(), cond, noise, schedule[:3])
    sde = rollout(tiny_policy, FlowSDE(0.7), cond, head.x0, schedule[2:5], generator=torch.Generator().manual_seed(1),
                  keep_trajectory=True)  # fmt: skip
    assert torch.equal(got.latents, sde.latents) and torch.equal(got.log_probs, sde.log_probs)
    # After the window: DPM-Solver++(2M) steps, the first one second order with the last window step's x̂0.
    x, history, dpm = sde.x0, None, DPMSolverPP2M()
    with torch.no_grad():
        t_prev = schedule[3]
        history = History(sde.latents[:, -2] - t_prev * tiny_policy.velocity(sde.latents[:, -2], t_prev.expand(2), cond),
                          t_prev)  # fmt: skip
        for k in range(4, 7):
            v = tiny_policy.velocity(x, schedule[k].expand(2), cond)
            step = dpm.step(v, x, schedule[k], schedule[k + 1], history=history)
            history, x = History(step.x0_pred, schedule[k]), step.x_next
    assert torch.allclose(got.x0, x, atol=1e-6)
    assert not torch.allclose(got.x0, rollout(tiny_policy, EulerODE(), cond, sde.x0, schedule[4:]).x0, atol=1e-4)


def test_window_checks():
    with pytest.raises(ValueError, match="size >= 1"):
        Window(0, 0)
    with pytest.raises(ValueError, match="deterministic"):
        Window(0, 1, outside=CPS(0.5))
    with pytest.raises(ValueError, match="after a window must be deterministic"):
        Window(0, 1, after=FlowSDE(0.5))
    assert 2 in Window(1, 2) and 3 not in Window(1, 2) and isinstance(Window(0, 1, DPMSolverPP2M()), Window)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_replaying_a_stored_transition_gives_back_its_log_prob(tiny_policy, scale):
    """On-policy, retaking a kept step (one j or one per sample, inside a window) reproduces the sampled log-prob."""
    texts = ["a red circle", "two blue squares", "a green triangle"]
    cond = tiny_policy.encode(texts)
    uncond = tiny_policy.encode([""] * 3) if scale != 1.0 else None
    noise = torch.randn(3, *tiny_policy.sample_shape, generator=torch.Generator().manual_seed(0))
    trajectory = rollout(tiny_policy, FlowSDE(0.7), cond, noise, flow_schedule(5), guidance_scale=scale, uncond=uncond,
                         generator=torch.Generator().manual_seed(1), keep_trajectory=True, window=Window(1, 3))  # fmt: skip
    sel = torch.tensor([2, 0])
    with torch.no_grad():
        log_prob, transition = replay_transition(tiny_policy, FlowSDE(0.7), trajectory, sel, 1, cond[sel], scale)
        per_sample, _ = replay_transition(tiny_policy, FlowSDE(0.7), trajectory, sel, torch.tensor([2, 1]), cond[sel],
                                          scale)  # fmt: skip
    assert torch.allclose(log_prob, trajectory.log_probs[sel, 1], atol=1e-6)
    assert torch.allclose(transition.x_next, transition.mean)  # no noise drawn: the mean
    assert torch.allclose(per_sample, trajectory.log_probs[sel, torch.tensor([2, 1])], atol=1e-6)
