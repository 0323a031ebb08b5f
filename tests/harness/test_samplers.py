"""Samplers against a Gaussian data distribution whose velocity is known in closed form."""

from pathlib import Path

import pytest
import torch

from harness.samplers import (
    CPS,
    SAMPLERS,
    DanceSDE,
    DPMSolverPP2M,
    EulerODE,
    FlowSDE,
    flow_schedule,
    gaussian_log_prob,
    make_sampler,
    noised,
)

MU, S = 0.7, 0.4  # data x0 ~ N(MU, S²) per dimension


def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[ε − x0 | x_t = x] for x_t = (1 − t)·x0 + t·ε with Gaussian x0."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    a, b = 1 - t, t
    var = a**2 * S**2 + b**2
    return (b - a * S**2) / var * (x - a * MU) - MU


def integrate(sampler, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    from harness.samplers import History

    ts = flow_schedule(num_steps)
    x, history = noise, None
    for k in range(num_steps):
        v = exact_velocity(x, ts[k].expand(x.shape[0]))
        step = sampler.step(v, x, ts[k], ts[k + 1], noise=torch.zeros_like(x), history=history)
        history = History(step.x0_pred, ts[k])
        x = step.x_next
    return x


def test_ode_samplers_transport_noise_to_data():
    noise = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    target = MU + S * noise  # the flow of a Gaussian path is the affine map between marginals
    euler_fine = integrate(EulerODE(), noise, 200)
    assert torch.allclose(euler_fine, target, atol=2e-2)
    euler10, dpm10 = integrate(EulerODE(), noise, 10), integrate(DPMSolverPP2M(), noise, 10)
    dpm_error, euler_error = (dpm10 - target).abs().max(), (euler10 - target).abs().max()
    assert dpm_error < 0.05 and dpm_error < euler_error / 5  # 2nd order in the interior steps
    assert euler_fine.mean().item() == pytest.approx(MU, abs=0.02)
    assert euler_fine.std().item() == pytest.approx(S, abs=0.02)


def test_flow_sde_at_zero_noise_is_the_euler_step():
    x, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    for t, t_next in [(1.0, 0.9), (0.6, 0.5), (0.1, 0.0)]:
        sde = FlowSDE(noise_level=0.0).step(v, x, t, t_next, noise=torch.randn_like(x))
        euler = EulerODE().step(v, x, t, t_next)
        assert torch.allclose(sde.x_next, euler.x_next, atol=1e-6)
        tiny = FlowSDE(noise_level=1e-8).step(v, x, t, t_next, noise=torch.randn_like(x))
        assert torch.allclose(tiny.x_next, euler.x_next, atol=1e-5)


def test_flow_sde_log_prob_is_the_gaussian_density():
    x, v = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t, t_next = torch.full((5,), 0.6), torch.full((5,), 0.5)
    sde = FlowSDE(noise_level=0.7)
    step = sde.step(v, x, t, t_next, noise=torch.randn_like(x))
    std = step.sigma * (t - t_next).sqrt().reshape(-1, 1, 1, 1)
    assert torch.allclose(step.std, std)
    expected = torch.distributions.Normal(step.mean, std.expand_as(step.mean)).log_prob(step.x_next).mean(dim=(1, 2, 3))
    assert torch.allclose(sde.log_prob(step.x_next, step), expected, atol=1e-5)
    # Replayed without noise, the transition scores any stored sample.
    other, replay = torch.randn_like(x), sde.step(v, x, t, t_next)
    assert torch.equal(replay.mean, step.mean)
    assert torch.allclose(
        sde.log_prob(other, replay),
        torch.distributions.Normal(step.mean, std.expand_as(step.mean)).log_prob(other).mean(dim=(1, 2, 3)),
        atol=1e-5,
    )
    # σ_t without the sqrt(−dt) factor; the t = 1 guard uses the next time in the denominator.
    assert torch.allclose(step.sigma.flatten(), 0.7 * torch.sqrt(t / (1 - t)))
    first = sde.step(v, x, torch.ones(5), torch.full((5,), 0.9), noise=torch.randn_like(x))
    assert torch.isfinite(sde.log_prob(first.x_next, first)).all()
    assert torch.allclose(first.sigma.flatten(), torch.full((5,), 0.7 * (1 / 0.1) ** 0.5))


def test_samplers_draw_no_randomness():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    state = torch.get_rng_state()
    for sampler in (EulerODE(), DPMSolverPP2M(), FlowSDE(0.7), CPS(0.8), DanceSDE(0.3)):
        step = sampler.step(v, x, 0.5, 0.4)
        assert torch.equal(step.x_next, step.mean)  # no noise given: the mean (a replay)
    assert torch.equal(torch.get_rng_state(), state)


def test_noised_is_the_forward_process_for_any_rank():
    for shape in [(2, 5), (2, 3, 4, 4), (2, 1, 3, 4, 4)]:
        x0, noise = torch.randn(shape), torch.randn(shape)
        t = torch.tensor([0.25, 1.0])
        got = noised(x0, noise, t)
        assert torch.allclose(got[0], 0.75 * x0[0] + 0.25 * noise[0]) and torch.equal(got[1], noise[1])
    with pytest.raises(ValueError, match="shape"):
        noised(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0.5]))


def test_sampler_log_prob_matches_transition():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    step = FlowSDE().step(v, x, 0.5, 0.4, noise=torch.randn_like(x))
    assert torch.allclose(FlowSDE().log_prob(step.x_next, step), gaussian_log_prob(step.x_next, step.mean, step.std))
    with pytest.raises(TypeError, match="deterministic"):
        EulerODE().log_prob(step.x_next, step)


def test_cps_at_zero_noise_is_ddim_and_logprob_convention():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    step = CPS(noise_level=0.0).step(v, x, 0.7, 0.4, noise=torch.randn_like(x))
    assert torch.allclose(step.x_next, EulerODE().step(v, x, 0.7, 0.4).x_next, atol=1e-6)
    noisy = CPS(noise_level=0.8).step(v, x, 0.7, 0.4, noise=torch.randn_like(x))
    assert torch.allclose(CPS().log_prob(noisy.x_next, noisy), -((noisy.x_next - noisy.mean) ** 2).mean(dim=(1, 2, 3)))
    # Its marginal coefficients are preserved: (1 − t_next)² ... the noise part has variance t_next².
    s = 0.4 * torch.sin(torch.tensor(0.8 * torch.pi / 2))
    assert torch.allclose(noisy.std.flatten(), s.expand(2))


def test_make_sampler_errors():
    with pytest.raises(KeyError, match="allowed: euler, dpm2, flow_sde, cps, dance_sde"):
        make_sampler("ddpm")
    with pytest.raises(ValueError, match="deterministic"):
        make_sampler("euler", noise_level=0.5)
    assert make_sampler("flow_sde", 0.5).noise_level == 0.5
    assert make_sampler("dance_sde", 0.3).noise_level == 0.3 and make_sampler("dance_sde").noise_level == 0.3


def test_flow_schedule_shift():
    assert torch.allclose(flow_schedule(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = flow_schedule(10, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and shifted[5] == pytest.approx(0.75)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_keeps_the_one_step_contract(name):
    """Shapes, dtypes, the replay (no noise → the mean), and the log-prob only where the step is stochastic."""
    sampler = make_sampler(name)
    x, v, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    for t, t_next in [(1.0, 0.8), (0.6, 0.4), (0.2, 0.0)]:
        step = sampler.step(v, x, t, t_next, noise=noise)
        replay = sampler.step(v, x, t, t_next)
        assert step.x_next.shape == step.mean.shape == step.x0_pred.shape == x.shape
        assert step.std.shape == step.sigma.shape == (3, 1, 1, 1)
        assert torch.equal(replay.mean, step.mean) and torch.equal(replay.x_next, replay.mean)
        if sampler.stochastic:
            assert torch.allclose(step.x_next, step.mean + step.std * noise)
            assert sampler.log_prob(step.x_next, replay).shape == (3,)
        else:
            assert torch.equal(step.x_next, step.mean) and not step.std.any()
            with pytest.raises(TypeError, match="deterministic"):
                sampler.log_prob(step.x_next, step)


FIXTURES = Path(__file__).resolve().parents[1] / "methods" / "fixtures"


def test_dance_sde_matches_the_official_flux_step():
    """Fixture: DanceGRPO's ``flux_step(sde_solver=True)`` run on fixed inputs (mean, x̂0, log-prob)."""
    fixture = torch.load(FIXTURES / "dance_sde_official.pt")
    sigmas = fixture["sigmas"]
    for case in fixture["cases"]:
        k, sde = case["index"], DanceSDE(case["eta"])
        step = sde.step(case["model_output"], case["latents"], sigmas[k], sigmas[k + 1])
        assert torch.allclose(step.mean, case["mean"], atol=1e-6), k
        assert torch.allclose(step.x0_pred, case["x0_pred"], atol=1e-6), k
        assert torch.allclose(sde.log_prob(case["prev_sample"], step), case["log_prob"], atol=1e-5), k
        assert torch.allclose(step.std.flatten(), case["eta"] * (sigmas[k] - sigmas[k + 1]).sqrt().expand(2))


def test_dance_sde_log_prob_zero_noise_and_sigma():
    x, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    for t, t_next in [(1.0, 0.9), (0.6, 0.5), (0.1, 0.0)]:
        zero = DanceSDE(0.0).step(v, x, t, t_next, noise=torch.randn_like(x))
        assert torch.allclose(zero.x_next, EulerODE().step(v, x, t, t_next).x_next, atol=1e-6)
    sde = DanceSDE(0.3)
    step = sde.step(v, x, 0.6, 0.5, noise=torch.randn_like(x))
    normal = torch.distributions.Normal(step.mean, step.std.expand_as(step.mean))
    assert torch.allclose(sde.log_prob(step.x_next, step), normal.log_prob(step.x_next).mean(dim=(1, 2, 3)), atol=1e-5)
    assert torch.allclose(step.sigma, torch.full((3, 1, 1, 1), 0.3))  # η: the std without sqrt(−dt)


def test_dance_sde_keeps_the_marginals_of_the_flow():
    """The paper's SDE: with the exact velocity (so the exact score, by Tweedie) the SDE has the ODE's marginals."""
    noise = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    draws = torch.Generator().manual_seed(1)
    ts, x, sde = flow_schedule(400), noise, DanceSDE(0.8)
    for k in range(400):
        v = exact_velocity(x, ts[k].expand(x.shape[0]))
        x = sde.step(v, x, ts[k], ts[k + 1], noise=torch.randn(x.shape, generator=draws)).x_next
    assert x.mean().item() == pytest.approx(MU, abs=0.03) and x.std().item() == pytest.approx(S, abs=0.03)
    assert not torch.allclose(x, integrate(EulerODE(), noise, 400), atol=1e-2)  # a different path, same marginal
