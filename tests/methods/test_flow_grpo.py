"""FlowGRPO's pure functions, the official sample filter, the on-policy ratio and the meter's counts."""

import json
from pathlib import Path

import pytest
import torch

from harness.compute import CountingPolicy, Ledger
from harness.optim import OptimConfig, Optimization
from harness.policy import guided_velocity, unconditional
from harness.samplers import FlowSDE
from harness.shapes_world.world import make_metadata
from harness.types import Prompt
from methods.flow_grpo import FlowGRPO, FlowGRPOConfig, gaussian_kl_mean, grpo_loss, zero_advantage_filter

FIXTURE = Path(__file__).parent / "fixtures" / "flow_grpo_filter_ema_official.json"


def test_flow_sde_step_has_the_official_semantics():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    prev = FlowSDE(1e-9).step(v, x, 0.5, 0.4, noise=torch.randn_like(x)).x_next
    assert torch.allclose(prev, x + (0.4 - 0.5) * v, atol=1e-5)
    sde = FlowSDE(0.7)
    replay = sde.step(v, x, 0.5, 0.4)  # no noise: the transition's mean and std, to score a stored sample
    assert torch.equal(replay.x_next, replay.mean)
    assert torch.allclose(replay.std, replay.sigma * 0.1**0.5)  # σ_t·sqrt(−dt); sigma is σ_t (the KL's)
    normal = torch.distributions.Normal(replay.mean, replay.std.expand_as(replay.mean))
    assert torch.allclose(sde.log_prob(prev, replay), normal.log_prob(prev).mean(dim=(1, 2, 3)), atol=1e-5)


def test_grpo_loss_clip_and_kl():
    adv = torch.tensor([1.0, -1.0, 2.0])
    old = torch.zeros(3)
    # ratio 1: loss = −mean(A)
    assert grpo_loss(old, old, adv, clip_range=0.2).item() == pytest.approx(-2 / 3)
    # ratio e^0.5 ≈ 1.65 clipped to 1.2 for A > 0 (min of the objective), unclipped for A < 0 (pessimistic)
    lp = torch.full((3,), 0.5)
    ratio = torch.exp(torch.tensor(0.5)).item()
    expected = (-1.0 * 1.2 + 1.0 * ratio - 2.0 * 1.2) / 3
    assert grpo_loss(lp, old, adv, clip_range=0.2).item() == pytest.approx(expected, rel=1e-6)
    assert grpo_loss(
        old, old, adv, clip_range=0.2, kl=torch.tensor([1.0, 2.0, 3.0]), kl_coef=0.1
    ).item() == pytest.approx(-2 / 3 + 0.2)
    # Zero advantage, zero policy gradient.
    lp = torch.zeros(3, requires_grad=True)
    grpo_loss(lp, old, torch.zeros(3), clip_range=1e-4).backward()
    assert lp.grad.abs().max() == 0


def test_gaussian_kl_mean_hand_computed():
    # Sample 1: Δμ = (1, 2) → mean Δμ² = 2.5, σ = 0.5 → 2.5/(2·0.25) = 5; sample 2: Δμ = (0, −2) → 2/(2·4) = 0.25.
    mean = torch.tensor([[1.0, 3.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
    mean_ref = torch.tensor([[0.0, 1.0], [0.0, 2.0]]).reshape(2, 1, 1, 2)
    sigma = torch.tensor([0.5, 2.0]).reshape(2, 1, 1, 1)  # (B, 1, 1, 1), as Transition.sigma holds σ_t
    assert gaussian_kl_mean(mean, mean_ref, sigma).tolist() == [5.0, 0.25]
    assert torch.equal(gaussian_kl_mean(mean, mean_ref, sigma.flatten()), gaussian_kl_mean(mean, mean_ref, sigma))
    # It is the closed-form KL of N(μ, σ²I) to N(μ_ref, σ²I), divided by the dimension (a mean, not a sum).
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, sigma.expand_as(mean)),
        torch.distributions.Normal(mean_ref, sigma.expand_as(mean)),
    )
    assert torch.allclose(gaussian_kl_mean(mean, mean_ref, sigma), kl.mean(dim=(1, 2, 3)))


def prompts(n_groups: int, group_size: int) -> tuple[list[Prompt], torch.Tensor]:
    md = [make_metadata("single_object", (s,)) for s in ("circle", "square", "triangle", "diamond")][:n_groups]
    expanded = [Prompt(m["prompt"], m) for m in md for _ in range(group_size)]
    return expanded, torch.arange(n_groups).repeat_interleave(group_size)


def make(tiny_policy, **overrides):
    ledger = Ledger()
    policy = CountingPolicy(tiny_policy, ledger)
    cfg = FlowGRPOConfig(num_steps=3, train_batch_size=64, **overrides)
    return FlowGRPO(cfg, policy, Optimization(policy.trainable_parameters(), OptimConfig(lr=1e-3))), ledger


@pytest.mark.parametrize("cfg_scale", [1.0, 4.5])
def test_first_ratio_is_one_on_policy_and_the_meter_counts(tiny_policy, cfg_scale):
    # One optimizer step, so that every ratio is 1 (the second of the official two steps moves θ).
    method, ledger = make(tiny_policy, check_on_policy=True, rollout_cfg=cfg_scale, train_cfg=cfg_scale,
                          optimizer_steps_per_iteration=1)  # fmt: skip
    expanded, groups = prompts(2, 3)
    with ledger.phase("sampling"):
        rollout = method.collect(expanded, groups, torch.Generator().manual_seed(0))
    cfg_factor = 2 if cfg_scale != 1.0 else 1
    assert ledger.forward["sampling"] == 6 * 3 * cfg_factor
    latents, steps = rollout.trajectory.latents, method.schedule
    x, x_next = latents[:, 0], latents[:, 1]
    with torch.no_grad():
        uncond = unconditional(method.policy, 6, cfg_scale)
        v = guided_velocity(method.policy, x, steps[0].expand(6), rollout.cond, uncond, cfg_scale)
        sde = FlowSDE(method.cfg.noise_level)
        log_prob = sde.log_prob(x_next, sde.step(v, x, steps[0], steps[1]))
    assert torch.equal(log_prob, rollout.trajectory.log_probs[:, 0])  # exactly the rollout's log-prob
    rewards = torch.tensor([0.1, 0.5, 0.9, 0.2, 0.4, 0.3])
    with ledger.phase("training"):
        logs = method.update(rollout, rewards, torch.Generator().manual_seed(1))
    n_train = int(3 * 0.99)  # all transitions but the last
    # θ with grad (plus its CFG branch) and the reference without, per sample-step.
    assert ledger.forward["training"] == 6 * n_train * (cfg_factor + cfg_factor)
    assert ledger.backward["training"] == 6 * n_train * cfg_factor
    assert logs["train/zero_std_ratio"] == 0.0 and logs["train/approx_kl"] < 1e-10


def test_zero_advantage_filter_matches_the_official_code():
    """Fixture: the official mask code (``train_sd3.py``; ``train_sd3_fast.py`` also refills an empty mask) run with
    ``torch.manual_seed(seed)``; the same draw here comes from a generator seeded alike."""
    for case in json.loads(FIXTURE.read_text())["sample_filter"]:
        got = zero_advantage_filter(torch.tensor(case["advantages"]), case["multiple"],
                                    torch.Generator().manual_seed(case["seed"]),
                                    refill_empty=case["version"] == "train_sd3_fast")  # fmt: skip
        assert got.tolist() == case["mask"], (case["version"], case["case"], case["seed"])


def test_zero_advantage_filter_hand_computed():
    adv = torch.tensor([0.5, 0.0, -1.0, 0.0, 2.0])
    # 3 non-zero, multiple 4: one of the two zero-advantage samples is turned back on.
    mask = zero_advantage_filter(adv, 4, torch.Generator().manual_seed(0))
    assert mask[[0, 2, 4]].all() and int(mask.sum()) == 4
    assert zero_advantage_filter(adv, 3, torch.Generator()).tolist() == [True, False, True, False, True]
    assert zero_advantage_filter(adv, 8, torch.Generator()).sum() == 3  # too few dropped to reach 8: none back
    assert not zero_advantage_filter(torch.zeros(4), 4, torch.Generator()).any()  # train_sd3.py: none kept
    assert zero_advantage_filter(torch.zeros(4), 4, torch.Generator(), refill_empty=True).all()  # the Fast script's
    with pytest.raises(ValueError, match="multiple"):
        zero_advantage_filter(adv, 0, torch.Generator())


def test_defaults_are_the_official_geneval_config():
    cfg = FlowGRPOConfig()
    assert cfg.sample_filter == "zero_advantage" and cfg.filter_multiple == 4
    assert cfg.optimizer_steps_per_iteration == 2 and cfg.ema_interval == 8 and cfg.ema_updates_per_step == 2


@pytest.mark.parametrize(("rule", "trained"), [("zero_advantage", 4), ("zero_std_groups", 3)])
def test_tied_samples_are_dropped(tiny_policy, rule, trained):
    method, ledger = make(tiny_policy, rollout_cfg=1.0, train_cfg=1.0, kl_coef=0.0, sample_filter=rule)
    expanded, groups = prompts(2, 3)
    rollout = method.collect(expanded, groups, torch.Generator().manual_seed(0))
    with ledger.phase("training"):
        logs = method.update(rollout, torch.tensor([1.0, 1.0, 1.0, 0.2, 0.5, 0.9]), torch.Generator())
    assert logs["train/zero_std_ratio"] == 0.5 and logs["train/kept_fraction"] == pytest.approx(trained / 6)
    # zero_advantage: the 3 informative samples plus one tied sample refilled (4 = filter_multiple); no ref pass.
    assert ledger.forward["training"] == trained * 2
    logs = method.update(rollout, torch.ones(6), torch.Generator())
    assert logs["train/skipped"] == 1.0 and method.optim.global_step == 2  # 2 steps in the first update only


def test_a_sample_at_its_group_mean_is_dropped_by_the_official_filter(tiny_policy):
    method, ledger = make(tiny_policy, rollout_cfg=1.0, train_cfg=1.0, kl_coef=0.0, filter_multiple=1)
    expanded, groups = prompts(2, 3)
    rollout = method.collect(expanded, groups, torch.Generator().manual_seed(0))
    with ledger.phase("training"):  # 0.5 is its group's mean: advantage exactly 0
        logs = method.update(rollout, torch.tensor([0.25, 0.5, 0.75, 0.0, 1.0, 0.5]), torch.Generator())
    assert logs["train/kept_fraction"] == pytest.approx(4 / 6) and ledger.forward["training"] == 4 * 2


def test_mismatched_cfg_warns_and_cannot_be_checked_on_policy(tiny_policy, caplog):
    make(tiny_policy, rollout_cfg=4.5, train_cfg=1.0)
    assert "the first ratio will not be 1" in caplog.text
    with pytest.raises(ValueError, match="check_on_policy needs rollout_cfg == train_cfg"):
        make(tiny_policy, rollout_cfg=4.5, train_cfg=1.0, check_on_policy=True)
