"""AWM: weightings, advantages and the loss on hand-computed values, the gradient identity, times, the loop."""

import pytest
import torch

from methods.awm import AWM, AWMConfig, awm_advantages, awm_log_prob, awm_loss, ema_decay
from methods.forward_process import flow_matching_error
from tests.methods.forward_smoke import counted, group_prompts, loop_smoke


def test_weightings_hand_computed():
    loss, t = torch.tensor([0.0625]), torch.tensor([0.5])  # ℓ = 0.5⁴
    assert awm_log_prob(loss, t, "uniform").item() == pytest.approx(-0.0625)
    assert awm_log_prob(loss, t, "t").item() == pytest.approx(-0.03125)
    assert awm_log_prob(loss, t, "t2").item() == pytest.approx(-0.015625)
    assert awm_log_prob(loss, t, "huber").item() == pytest.approx(-(0.25 - 1e-5) * 0.5, rel=1e-8)
    # ghuber, p = 1/4: ((ℓ + 1e-10)^p − (1e-10)^p)·t/p = (0.5 − 10^−2.5)·0.5·4 = 2·(0.5 − 0.0031623)
    assert awm_log_prob(loss, t, "ghuber", 0.25).item() == pytest.approx(-2 * (0.5 - 0.00316227766), rel=1e-8)
    # ghuber with p = 1 is the t-weighted loss.
    assert awm_log_prob(loss, t, "ghuber", 1.0).item() == pytest.approx(-0.03125, rel=1e-8)
    with pytest.raises(ValueError, match="weighting"):
        awm_log_prob(loss, t, "sigmoid")  # type: ignore[arg-type]


def test_advantages_are_clipped_then_rescaled():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    groups = torch.tensor([0, 0, 1, 1])
    std = 0.5 * (0.5**0.5)  # population std of (1, 0, 0.5, 0.5) = sqrt(0.125)
    a = 0.5 / (std + 1e-4)
    expected = torch.tensor([a, -a, 0.0, 0.0]) / 5.0  # |A| = 1.41 < A_max = 5, then ×1/5
    got = awm_advantages(rewards, groups, std="global", adv_clip_max=5.0, advantage_max=1.0)
    assert torch.allclose(got, expected, atol=1e-6)
    clipped = awm_advantages(rewards, groups, std="global", adv_clip_max=1.0, advantage_max=1.0)
    assert torch.allclose(clipped, torch.tensor([1.0, -1.0, 0.0, 0.0]), atol=1e-6)


def test_loss_hand_computed_and_the_on_policy_gradient_is_advantage_weighted_matching():
    adv = torch.tensor([0.5, -1.0])
    lp = torch.tensor([-0.2, -0.4])
    kl, ema_kl = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0])
    # ρ = 1: −mean(A) + 0.1·mean(kl) + 0.5·mean(ema_kl) = 0.25 + 0.2 + 1.5
    total = awm_loss(lp, lp, adv, clip_range=1.0, kl=kl, kl_coef=0.1, ema_kl=ema_kl, ema_kl_coef=0.5)
    assert total.item() == pytest.approx(0.25 + 0.2 + 1.5)
    # ρ = e^{0.5} ≈ 1.649 with ε = 0.2: A > 0 clipped to 1.2; A < 0 keeps the larger (unclipped) −A·ρ.
    r = torch.exp(torch.tensor(0.5)).item()
    off = awm_loss(lp + 0.5, lp, adv, clip_range=0.2)
    assert off.item() == pytest.approx((-0.5 * 1.2 + 1.0 * r) / 2, rel=1e-6)
    # On-policy, uniform weighting: ∂L/∂v_i = A_i·2(v_i − u_i)/(D·B), the paper's A·∇ℓ.
    x0, noise = torch.tensor([[0.0, 2.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    v = torch.tensor([[1.0, -1.0], [3.0, 0.0]], requires_grad=True)
    log_prob = awm_log_prob(flow_matching_error(v, x0, noise), torch.tensor([0.3, 0.7]), "uniform")
    awm_loss(log_prob, log_prob.detach(), adv, clip_range=1e-5).backward()
    expected = adv[:, None] * 2 * (v.detach() - (noise - x0)) / (2 * 2)
    assert torch.allclose(v.grad, expected, atol=1e-6)
    # Zero advantage, zero policy gradient.
    v.grad = None
    log_prob = awm_log_prob(flow_matching_error(v, x0, noise), torch.tensor([0.3, 0.7]))
    awm_loss(log_prob, log_prob.detach(), torch.zeros(2), clip_range=1.0).backward()
    assert v.grad.abs().max() == 0


def test_ema_decay_schedules():
    assert ema_decay(100, 0.3, "linear") == pytest.approx(0.1)
    assert ema_decay(1000, 0.3, "linear") == 0.3
    assert ema_decay(5, 0.3, "constant") == 0.3
    with pytest.raises(ValueError, match="ema_decay_type"):
        ema_decay(1, 0.3, "cosine")


def test_training_times_are_stratified_schedule_steps_without_t_one(tiny_policy):
    method, _ = counted(AWM, AWMConfig(), tiny_policy)  # 14 steps, 6 strata of indices in [1, 12)
    strata = [(1, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        times = method.training_times(g)
        assert times.shape == (6,)
        for k, (lo, hi) in enumerate(strata):
            allowed = method.schedule[lo:hi]
            assert torch.isclose(allowed, times[k]).any(), (k, times[k], allowed)


def test_update_counts_keeps_ratio_one_on_policy_and_moves_the_ema_anchor(tiny_policy):
    method, ledger = counted(AWM, AWMConfig(num_steps=6, train_timesteps=2), tiny_policy)
    prompts, groups = group_prompts(2, 3)
    with ledger.phase("sampling"):
        rollout = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    assert ledger.forward["sampling"] == 6 * 6
    old_before = tiny_policy.weight_state("old")
    with ledger.phase("training"):
        logs = method.update(rollout, torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2]), torch.Generator().manual_seed(1))
    # Per (sample, t): θ with grad, the reference and the EMA without.
    assert ledger.forward["training"] == 3 * 6 * 2 and ledger.backward["training"] == 6 * 2
    assert logs["train/clipfrac"] == 0.0 and logs["train/ema_kl"] == 0.0  # θ = EMA anchor before the step
    assert logs["train/ema_decay"] == pytest.approx(0.001)
    theta, old = tiny_policy.weight_state("train"), tiny_policy.weight_state("old")
    assert all(torch.allclose(old[k], 0.001 * old_before[k] + 0.999 * theta[k], atol=1e-6) for k in theta)


def test_several_optimizer_steps_take_old_likelihoods_before_the_update(tiny_policy):
    cfg = AWMConfig(num_steps=6, train_timesteps=2, optimizer_steps_per_iteration=2, kl_coef=0.0, ema_kl_coef=0.0)
    method, ledger = counted(AWM, cfg, tiny_policy, lr=1e-2)
    prompts, groups = group_prompts(2, 3)
    rollout = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    with ledger.phase("training"):
        logs = method.update(rollout, torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2]), torch.Generator().manual_seed(1))
    # The second half's old log-likelihoods: one extra no-grad pass of θ before any step.
    assert ledger.forward["training"] == 6 * 2 + 3 * 2 and ledger.backward["training"] == 6 * 2
    assert logs["train/kl"] == 0.0 and "train/grad_norm" in logs


def test_chunk_draws_are_lazy_and_repeatable_and_the_fraction_is_checked(tiny_policy):
    method, _ = counted(AWM, AWMConfig(num_steps=6, train_timesteps=2, train_batch_size=2), tiny_policy)
    chunk = torch.tensor([3, 0, 5, 1, 4])
    first = method._chunk_draws(chunk, 7, torch.Size([1, 2, 2]))
    again = method._chunk_draws(chunk, 7, torch.Size([1, 2, 2]))
    assert [d[0].tolist() for d in first] == [[3, 0], [5, 1], [4]]  # micro-batches of the chunk
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(first, again, strict=True))
    assert first[2][2].shape == (2, 1, 1, 2, 2)  # (train_timesteps, b, C, H, W)
    assert not torch.equal(method._chunk_draws(chunk, 8, torch.Size([1, 2, 2]))[0][2], first[0][2])
    with pytest.raises(ValueError, match="timestep_fraction"):
        counted(AWM, AWMConfig(num_steps=6, timestep_fraction=1.5), tiny_policy)


def test_off_policy_samples_with_the_ema(tiny_policy):
    loop_smoke("awm", AWMConfig(num_steps=4, train_timesteps=2, off_policy=True, clip_range=1e-5), tiny_policy)


def test_defaults_follow_the_latest_official_geneval_config():
    """Official ``dgx_awm.py`` @ be51372: GenEval β = 0.001 (was 0.003), evaluation EMA decay 0.99 (interval 1)."""
    from harness.optim import method_ema_settings

    cfg = AWMConfig()
    assert cfg.kl_coef == 0.001 and cfg.eval_ema_decay == 0.99 and cfg.ema_interval == 1
    assert method_ema_settings(cfg) == {"ema_interval": 1, "ema_max_decay": 0.99}
    with pytest.raises(ValueError, match="eval_ema_decay"):
        AWMConfig(eval_ema_decay=1.0)
