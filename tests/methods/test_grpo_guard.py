"""GRPO-Guard: RatioNorm and the reweighted loss against the official code and the paper's identities, μ_old, counts.

``fixtures/grpo_guard_official.json`` holds fixed inputs and the outputs of the official code run on them, outside
this repository: ``sde_step_with_logprob(..., return_sqrt_dt=True)`` and the RatioNorm / reweighted-loss block of
``scripts/train_sd3_GRPO_Guard.py`` (yifan123/flow_grpo@2e2f712), on a diffusers ``FlowMatchEulerDiscreteScheduler``.
"""

import json
from pathlib import Path

import pytest
import torch

from harness.policy import iter_batches
from harness.samplers import FlowSDE
from methods.flow_grpo import grpo_loss
from methods.grpo_guard import GRPOGuard, GRPOGuardConfig, grpo_guard_loss, ratio_norm_log_ratio
from tests.methods.forward_smoke import counted, group_prompts

FIXTURE = Path(__file__).parent / "fixtures" / "grpo_guard_official.json"


def official_cases() -> list[dict]:
    cases = json.loads(FIXTURE.read_text())["cases"]
    return [{k: torch.tensor(v) if isinstance(v, list) else v for k, v in case.items()} for case in cases]


@pytest.mark.parametrize("case", official_cases(), ids=lambda c: f"step{c['j']}-clip{c['clip_range']}")
def test_matches_the_official_code(case):
    sde = FlowSDE(0.7)
    v_theta = case["v_theta"].clone().requires_grad_(True)
    theta = sde.step(v_theta, case["x"], case["t"], case["t_next"])
    old = sde.step(case["v_old"], case["x"], case["t"], case["t_next"])
    # The shared Flow-SDE step is the official one, t = 1 guard included (step 0).
    assert torch.allclose(theta.mean, case["mean"], atol=1e-6) and torch.allclose(old.mean, case["mean_old"], atol=1e-6)
    log_prob, old_log_prob = sde.log_prob(case["x_next"], theta), sde.log_prob(case["x_next"], old)
    assert torch.allclose(log_prob, case["log_prob"], atol=1e-5)
    assert torch.allclose(old_log_prob, case["log_prob_old"], atol=1e-5)
    log_ratio = ratio_norm_log_ratio(log_prob, old_log_prob, theta.mean, old.mean, theta.std, bias="micro_batch")
    assert torch.allclose(log_ratio.exp(), case["ratio"], atol=1e-6)
    dt = torch.full((4,), case["t_next"] - case["t"])
    loss = grpo_guard_loss(log_ratio, case["advantages"], dt, clip_range=case["clip_range"])
    assert loss.item() == pytest.approx(float(case["loss"]), rel=1e-5, abs=1e-7)
    loss.backward()
    assert torch.allclose(v_theta.grad, case["grad_v_theta"], rtol=1e-4, atol=1e-6)


def transitions(seed: int = 0, shift: float = 0.3) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x, v_old = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    v_theta = v_old + shift * torch.randn(5, 2, 3, 3, generator=g)
    sde = FlowSDE(0.7)
    old, theta = sde.step(v_old, x, 0.6, 0.5), sde.step(v_theta, x, 0.6, 0.5)
    eps = torch.randn(x.shape, generator=g)
    x_next = old.mean + old.std * eps
    return sde, old, theta, x_next, eps


def test_ratio_norm_removes_the_bias_and_the_step_scale():
    """Paper §4.2: with x' = μ_old + s·ε, log ρ̂ = (log ρ + b_t)·s = mean(ε·Δμ), zero-mean under the old policy."""
    sde, old, theta, x_next, eps = transitions()
    log_prob, old_log_prob = sde.log_prob(x_next, theta), sde.log_prob(x_next, old)
    raw = log_prob - old_log_prob
    delta = theta.mean - old.mean
    bias = (delta**2).mean(dim=(1, 2, 3)) / (2 * old.std.flatten() ** 2)
    # The raw log-ratio is the zero-mean term minus the bias (its left shift).
    assert torch.allclose(raw, (eps * delta).mean(dim=(1, 2, 3)) / old.std.flatten() - bias, atol=1e-4)
    per_sample = ratio_norm_log_ratio(log_prob, old_log_prob, theta.mean, old.mean, old.std, bias="per_sample")
    assert torch.allclose(per_sample, (eps * delta).mean(dim=(1, 2, 3)), atol=1e-5)
    # The official micro-batch bias shifts every sample by the same amount, the batch mean of the per-sample biases.
    batch = ratio_norm_log_ratio(log_prob, old_log_prob, theta.mean, old.mean, old.std, bias="micro_batch")
    shift = (batch - per_sample) / old.std.flatten()
    assert torch.allclose(shift, (bias.mean() - bias), atol=1e-3)
    # θ = θ_old: ρ̂ = 1 exactly.
    same = ratio_norm_log_ratio(old_log_prob, old_log_prob, old.mean, old.mean, old.std, bias="micro_batch")
    assert torch.equal(same, torch.zeros(5))
    with pytest.raises(ValueError, match="bias"):
        ratio_norm_log_ratio(log_prob, old_log_prob, theta.mean, old.mean, old.std, bias="global")  # type: ignore[arg-type]


def test_reweighting_divides_by_minus_dt_and_both_off_is_flowgrpo():
    log_ratio = torch.tensor([0.01, -0.02, 0.3, 0.0])
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.0])
    dt = torch.full((4,), -0.1)
    plain = grpo_loss(log_ratio, torch.zeros(4), advantages, clip_range=0.05)
    assert grpo_guard_loss(log_ratio, advantages, dt, clip_range=0.05).item() == pytest.approx(plain.item() / 0.1)
    assert grpo_guard_loss(log_ratio, advantages, dt, clip_range=0.05, reweight=False).item() == pytest.approx(
        plain.item()
    )
    # Per-sample weights: each sample's clipped term scaled by its own 1/(−Δt).
    dt = torch.tensor([-0.1, -0.2, -0.4, -0.5])
    expected = sum(grpo_loss(log_ratio[i : i + 1], torch.zeros(1), advantages[i : i + 1], clip_range=0.05) / -dt[i]
                   for i in range(4)) / 4  # fmt: skip
    assert grpo_guard_loss(log_ratio, advantages, dt, clip_range=0.05).item() == pytest.approx(expected.item())
    kl = torch.tensor([1.0, 2.0, 3.0, 4.0])
    with_kl = grpo_guard_loss(log_ratio, advantages, dt, clip_range=0.05, kl=kl, kl_coef=0.1)
    assert with_kl.item() == pytest.approx(expected.item() + 0.25)  # the KL term is not reweighted
    # Zero advantage, zero gradient; and Δt must be negative.
    lr = log_ratio.clone().requires_grad_(True)
    grpo_guard_loss(lr, torch.zeros(4), dt, clip_range=2e-6).backward()
    assert lr.grad.abs().max() == 0
    with pytest.raises(ValueError, match="dt must be < 0"):
        grpo_guard_loss(log_ratio, advantages, -dt, clip_range=0.05)
    # The config's switches off reproduce FlowGRPO's loss through the method's path.
    sde, old, theta, x_next, _ = transitions(1)
    lp, olp = sde.log_prob(x_next, theta), sde.log_prob(x_next, old)
    plain = grpo_guard_loss(lp - olp, advantages.repeat(2)[:5], torch.full((5,), -0.1), clip_range=0.2, reweight=False)
    assert plain.item() == pytest.approx(grpo_loss(lp, olp, advantages.repeat(2)[:5], clip_range=0.2).item())


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_on_policy_ratio_is_one_and_the_meter_counts(tiny_policy, cfg_scale):
    cfg = GRPOGuardConfig(num_steps=3, guidance_scale=cfg_scale, train_batch_size=4, optimizer_steps_per_iteration=1)
    method, ledger = counted(GRPOGuard, cfg, tiny_policy)
    prompts, groups = group_prompts(2, 3)
    with ledger.phase("sampling"):
        rollout = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    cfg_factor = 2 if cfg_scale != 1.0 else 1
    assert ledger.forward["sampling"] == 6 * 3 * cfg_factor
    with ledger.phase("training"):
        logs = method.update(rollout, torch.tensor([0.1, 0.9, 0.6, 0.2, 0.4, 0.8]), torch.Generator().manual_seed(1))
    n_train = int(3 * 0.99)
    # One optimizer step: μ_old is θ's own mean (no extra pass); no KL (kl_coef 0, official).
    assert (
        ledger.forward["training"] == 6 * n_train * cfg_factor
        and ledger.backward["training"] == 6 * n_train * cfg_factor
    )
    assert logs["train/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert logs["train/approx_kl"] == pytest.approx(0.0, abs=1e-9)
    assert logs["train/grad_norm"] > 0


def test_later_optimizer_steps_take_mu_old_before_the_update(tiny_policy, monkeypatch):
    cfg = GRPOGuardConfig(num_steps=3, guidance_scale=1.0, train_batch_size=2, optimizer_steps_per_iteration=2)
    method, ledger = counted(GRPOGuard, cfg, tiny_policy, lr=1e-2)
    prompts, groups = group_prompts(2, 3)
    rollout = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    seen: dict = {}
    take = method._take_old_means

    def spy(rollout_, chunks, g):
        take(rollout_, chunks, g)
        seen.update(chunks=chunks, means=dict(method._old_means))
        with torch.no_grad():  # θ before the first step: the stored means are θ_old's
            for b, positions in enumerate(iter_batches(len(chunks[1]), 2)):
                sel = chunks[1][positions]
                for j in range(2):
                    assert torch.equal(
                        seen["means"][1, b, j], method._replay(rollout.trajectory, sel, j, rollout.cond[sel])[1].mean
                    )

    monkeypatch.setattr(method, "_take_old_means", spy)
    with ledger.phase("training"):
        method.update(rollout, torch.tensor([0.1, 0.9, 0.6, 0.2, 0.4, 0.8]), torch.Generator().manual_seed(1))
    second = len(seen["chunks"][1])
    assert set(seen["means"]) == {(1, b, j) for b in range(-(-second // 2)) for j in range(2)}
    # The passes, the extra μ_old forwards of the second step's samples, and this spy's own check of them.
    assert ledger.forward["training"] == 6 * 2 + second * 2 + second * 2 and ledger.backward["training"] == 6 * 2
    assert method._old_means == {}


def test_zero_advantage_samples_are_dropped_and_a_tied_batch_skips(tiny_policy):
    cfg = GRPOGuardConfig(num_steps=3, guidance_scale=1.0, optimizer_steps_per_iteration=1)
    method, ledger = counted(GRPOGuard, cfg, tiny_policy)
    prompts, groups = group_prompts(2, 3)
    rollout = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    with ledger.phase("training"):
        logs = method.update(rollout, torch.tensor([0.5, 0.5, 0.5, 0.1, 0.9, 0.3]), torch.Generator().manual_seed(1))
    # FlowGRPO's official filter: the tied group's samples go (too few to refill a multiple of 8).
    assert logs["train/zero_std_ratio"] == 0.5 and ledger.forward["training"] == 3 * 2
    logs = method.update(rollout, torch.full((6,), 0.5), torch.Generator().manual_seed(2))
    assert logs["train/zero_std_ratio"] == 1.0 and logs["train/skipped"] == 1.0


def test_config_checks():
    with pytest.raises(ValueError, match="clip_range"):
        GRPOGuardConfig(clip_range=0.0)
    with pytest.raises(ValueError, match="ratio_bias must be one of"):
        GRPOGuardConfig(ratio_bias="global")  # type: ignore[arg-type]
    assert GRPOGuardConfig(num_steps=10).train_steps == 9
