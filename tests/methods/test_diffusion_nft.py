"""DiffusionNFT's pure functions against paper identities and hand-computed values; the positive-only ablation."""

import dataclasses

import pytest
import torch

from methods.diffusion_nft import (
    POSITIVE_ADVANTAGES_ONLY,
    POSITIVE_BRANCH_ONLY,
    DiffusionNFTConfig,
    mode_advantages,
    nft_loss,
    optimality_probability,
    soft_update_eta,
)
from tests.methods.forward_smoke import loop_smoke


def test_optimality_probability_official_formula():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    groups = torch.tensor([0, 0, 1, 1])
    std = rewards.std(unbiased=False).item() + 1e-4  # one population std over the batch
    expected_adv = torch.tensor([0.5, -0.5, 0.0, 0.0]) / std
    r = optimality_probability(rewards, groups)
    assert torch.allclose(r, 0.5 + expected_adv.clamp(-5, 5) / 10, atol=1e-6)
    # Per-group std: the second group has zero spread, so its advantages stay 0.
    r_group = optimality_probability(rewards, groups, std="group")
    assert torch.allclose(
        r_group, torch.tensor([0.5 + (0.5 / (0.5 + 1e-4)) / 10, 0.5 - (0.5 / (0.5 + 1e-4)) / 10, 0.5, 0.5]), atol=1e-6
    )
    # Clipping at ±A_max.
    assert (
        optimality_probability(torch.tensor([100.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long), 1.0).max() == 1.0
    )


def small_case(seed=0, batch=3, shape=(2, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, *shape, generator=g)
    noise = torch.randn(batch, *shape, generator=g)
    t = torch.tensor([0.9, 0.5, 0.2])[:batch]
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    v_old = torch.randn(batch, *shape, generator=g)
    return x0, noise, t, x_t, v_old


def test_at_theta_equals_old_the_gradient_is_advantage_signed_weighted_fm():
    """Reference §1.5: dℓ/dv_θ = −2·t²·A_clip·(v − v_old)/(D·w) per sample (then /B for the batch mean)."""
    x0, noise, t, x_t, v_old = small_case()
    r = torch.tensor([0.9, 0.2, 0.5])
    for beta in (1.0, 0.1):
        v_theta = v_old.clone().requires_grad_(True)
        nft_loss(v_theta, v_old, v_old, x0, x_t, t, r, beta=beta, kl_coef=0.0).backward()
        v = noise - x0
        t4 = t[:, None, None, None]
        w = (t4 * (v - v_old)).abs().mean(dim=(1, 2, 3), keepdim=True)
        a_clip = (r - 0.5) * 2 * 5.0
        d = x0[0].numel()
        expected = -2 * t4**2 * a_clip[:, None, None, None] * (v - v_old) / (d * w) / x0.shape[0]
        assert torch.allclose(v_theta.grad, expected, atol=1e-6), beta  # independent of β
        assert v_theta.grad[2].abs().max() < 1e-6  # r = 0.5 (A = 0) contributes no policy gradient


def test_r_half_is_flow_matching_centred_on_v_old():
    x0, noise, t, x_t, v_old = small_case(1)
    r = torch.full((3,), 0.5)
    delta = 0.1 * torch.randn_like(v_old)
    beta = 0.7
    loss = nft_loss(v_old + delta, v_old, v_old, x0, x_t, t, r, beta=beta, kl_coef=0.0, loss_space="v")
    v = (x_t - x0) / t[:, None, None, None]
    # 0.5·(‖v⁺ − v‖² + ‖v⁻ − v‖²) = ‖v_old − v‖² + β²‖v_θ − v_old‖²: minimised at v_θ = v_old.
    expected = ((v_old - v) ** 2).mean(dim=(1, 2, 3)) + beta**2 * (delta**2).mean(dim=(1, 2, 3))
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    for space in ("x0", "v"):
        v_theta = v_old.clone().requires_grad_(True)
        nft_loss(v_theta, v_old, v_old, x0, x_t, t, r, beta=beta, kl_coef=0.0, loss_space=space).backward()
        assert v_theta.grad.abs().max() < 1e-7


def test_both_loss_spaces_on_hand_computed_values():
    # One sample, two dims, t = 0.5: x0 = (0, 2), ε = (2, 0) → x_t = (1, 1), v = ε − x0 = (2, −2).
    x0, x_t, t = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([0.5])
    v_old, v_theta, v_ref = torch.tensor([[1.0, -1.0]]), torch.tensor([[3.0, -1.0]]), torch.tensor([[1.0, -2.0]])
    r, beta = torch.tensor([0.75]), 0.5
    # v⁺ = 0.5·v_old + 0.5·v_θ = (2, −1); v⁻ = 1.5·v_old − 0.5·v_θ = (0, −1)
    # x̂0⁺ = x_t − t·v⁺ = (0, 1.5) → error (0, −0.5): MSE 0.125, MAE 0.25 → L⁺ = 0.5
    # x̂0⁻ = (1, 1.5) → error (1, −0.5): MSE 0.625, MAE 0.75 → L⁻ = 5/6
    # (A_max/β)·(0.75·0.5 + 0.25·5/6) = 10·(0.375 + 0.208333) = 5.833333; KL = mean((2, 1)²) = 2.5
    x0_loss = nft_loss(v_theta, v_old, v_ref, x0, x_t, t, r, beta=beta, kl_coef=0.1)
    assert x0_loss.item() == pytest.approx(10 * (0.375 + 0.25 * 5 / 6) + 0.1 * 2.5, rel=1e-6)
    # v-space: ‖v⁺ − v‖² = mean((0, 1)²) = 0.5; ‖v⁻ − v‖² = mean((−2, 1)²) = 2.5 → 0.75·0.5 + 0.25·2.5 = 1.0
    v_loss = nft_loss(v_theta, v_old, v_ref, x0, x_t, t, r, beta=beta, kl_coef=0.1, loss_space="v")
    assert v_loss.item() == pytest.approx(1.0 + 0.25, rel=1e-6)


def test_bad_arguments():
    x0, _, t, x_t, v_old = small_case()
    with pytest.raises(ValueError, match="t must have shape"):
        nft_loss(v_old, v_old, v_old, x0, x_t, t[:, None], torch.ones(3), beta=1.0)
    with pytest.raises(ValueError, match="loss_space"):
        nft_loss(v_old, v_old, v_old, x0, x_t, t, torch.ones(3), beta=1.0, loss_space="eps")  # type: ignore[arg-type]


def test_soft_update_schedules():
    assert soft_update_eta(10, 0) == 0.0
    assert soft_update_eta(100, 1) == pytest.approx(0.1) and soft_update_eta(800, 1) == 0.5
    assert (
        soft_update_eta(74, 2) == 0.0
        and soft_update_eta(85, 2) == pytest.approx(0.075)
        and soft_update_eta(10**4, 2) == 0.999
    )
    with pytest.raises(ValueError, match="decay_type"):
        soft_update_eta(1, 3)


def test_update_costs_three_passes_per_sample_step_and_moves_only_theta(tiny_policy):
    from harness.compute import CountingPolicy, Ledger
    from harness.optim import OptimConfig, Optimization
    from harness.shapes_world.world import make_metadata
    from harness.types import Prompt
    from methods.diffusion_nft import DiffusionNFT, DiffusionNFTConfig

    ledger = Ledger()
    policy = CountingPolicy(tiny_policy, ledger)
    method = DiffusionNFT(
        DiffusionNFTConfig(num_steps=4), policy, Optimization(policy.trainable_parameters(), OptimConfig(lr=1e-2))
    )
    md = [make_metadata("single_object", (s,)) for s in ("circle", "square")]
    expanded = [Prompt(m["prompt"], m) for m in md for _ in range(3)]
    groups = torch.arange(2).repeat_interleave(3)
    with ledger.phase("sampling"):
        rollout = method.collect(expanded, groups, torch.Generator().manual_seed(0))
    assert ledger.forward["sampling"] == 6 * 4
    ref_before = tiny_policy.weight_state("ref")
    with ledger.phase("training"):
        logs = method.update(rollout, torch.tensor([0.0, 1.0, 0.5, 0.2, 0.3, 0.9]), torch.Generator().manual_seed(1))
    k = int(4 * 0.99)  # one random schedule step dropped per sample
    assert ledger.forward["training"] == 3 * 6 * k and ledger.backward["training"] == 6 * k
    assert logs["train/eta"] == pytest.approx(0.001)  # decay type 1 after one optimizer step
    ref_after, theta = tiny_policy.weight_state("ref"), tiny_policy.weight_state("train")
    assert all(torch.equal(ref_before[key], ref_after[key]) for key in ref_before)
    assert any(not torch.equal(ref_after[key], theta[key]) for key in theta)
    # old = 0.001·old + 0.999·θ after the step
    old = tiny_policy.weight_state("old")
    assert all(torch.allclose(old[key], 0.001 * ref_before[key] + 0.999 * theta[key], atol=1e-6) for key in theta)


# Positive-only ablation (negative branch dropped); the default is unchanged.


def hand_case():
    # One sample, two dims, t = 0.5 (the case of test_diffusion_nft): x_t = (1, 1), v = ε − x0 = (2, −2).
    x0, x_t, t = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([0.5])
    v_old, v_theta, v_ref = torch.tensor([[1.0, -1.0]]), torch.tensor([[3.0, -1.0]]), torch.tensor([[1.0, -2.0]])
    return v_theta, v_old, v_ref, x0, x_t, t, torch.tensor([0.75])


def test_positive_only_drops_the_negative_term_hand_computed():
    args = hand_case()
    # x0-space: L⁺ = 0.5 (as test_diffusion_nft) → (A_max/β)·r·L⁺ = 10·0.75·0.5 = 3.75, KL 0.1·2.5.
    assert nft_loss(*args, beta=0.5, kl_coef=0.1, negative_branch=False).item() == pytest.approx(3.75 + 0.25)
    # v-space: ‖v⁺ − v‖² = 0.5 → 0.75·0.5 = 0.375, plus KL.
    got = nft_loss(*args, beta=0.5, kl_coef=0.1, loss_space="v", negative_branch=False).item()
    assert got == pytest.approx(0.375 + 0.25)
    # The default still includes the negative branch (values of test_diffusion_nft).
    assert nft_loss(*args, beta=0.5, kl_coef=0.1).item() == pytest.approx(10 * (0.375 + 0.25 * 5 / 6) + 0.25)


def test_positive_only_never_pushes_away_from_a_sample():
    # At θ = old the full loss pushes v_θ away from low-reward samples (r < 0.5); positive-only pulls
    # towards every sample, more weakly for lower r, and gives no gradient at r = 0.
    g = torch.Generator().manual_seed(0)
    x0, noise, v_old = (torch.randn(3, 2, 3, 3, generator=g) for _ in range(3))
    t = torch.tensor([0.9, 0.5, 0.2])
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    r = torch.tensor([0.0, 0.3, 1.0])
    direction = (noise - x0) - v_old  # towards the sample's target
    for negative_branch, signs in ((True, [-1, -1, 1]), (False, [0, 1, 1])):
        v_theta = v_old.clone().requires_grad_(True)
        nft_loss(
            v_theta, v_old, v_old, x0, x_t, t, r, beta=1.0, kl_coef=0.0, negative_branch=negative_branch
        ).backward()
        descent = (-v_theta.grad * direction).sum(dim=(1, 2, 3))
        assert torch.sign(descent).tolist() == signs, negative_branch


def test_positive_only_presets_and_defaults():
    assert DiffusionNFTConfig().negative_branch is True and DiffusionNFTConfig().adv_mode == "all"
    assert DiffusionNFTConfig(negative_branch=False) == POSITIVE_BRANCH_ONLY  # the paper's ablation
    assert DiffusionNFTConfig(adv_mode="positive_only") == POSITIVE_ADVANTAGES_ONLY  # the official code's option
    assert POSITIVE_ADVANTAGES_ONLY.negative_branch is True and POSITIVE_BRANCH_ONLY.adv_mode == "all"


def test_official_adv_modes_hand_computed():
    """``train_nft_sd3.py``'s ``adv_mode`` on clipped advantages (A_max = 5), then r = 0.5 + A/(2·A_max)."""
    a = torch.tensor([-5.0, -1.0, 0.0, 2.0, 5.0])
    assert mode_advantages(a, "all", 5.0).tolist() == a.tolist()
    assert mode_advantages(a, "positive_only", 5.0).tolist() == [0.0, 0.0, 0.0, 2.0, 5.0]
    assert mode_advantages(a, "negative_only", 5.0).tolist() == [-5.0, -1.0, 0.0, 0.0, 0.0]
    assert mode_advantages(a, "one_only", 5.0).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert mode_advantages(a, "binary", 5.0).tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="adv_mode"):
        mode_advantages(a, "none", 5.0)  # type: ignore[arg-type]
    # positive_only: r ∈ [0.5, 1], both branches kept: r = 0.5 for a below-mean sample (not a push away, not 0).
    rewards, groups = torch.tensor([0.0, 1.0, 0.2, 0.6]), torch.tensor([0, 0, 1, 1])
    r = optimality_probability(rewards, groups, 5.0, "global", "positive_only")
    full = optimality_probability(rewards, groups, 5.0, "global")
    assert r[[0, 2]].tolist() == [0.5, 0.5] and torch.equal(r[[1, 3]], full[[1, 3]]) and (full[[0, 2]] < 0.5).all()


def test_the_two_positive_only_variants_differ_hand_computed():
    """At r = 0.5 (a clamped negative advantage) the official variant keeps ½·L⁺ + ½·L⁻; the paper's keeps ½·L⁺."""
    v_theta, v_old, v_ref, x0, x_t, t, _ = hand_case()
    half = torch.tensor([0.5])
    both = nft_loss(v_theta, v_old, v_ref, x0, x_t, t, half, beta=0.5, kl_coef=0.0).item()
    positive = nft_loss(v_theta, v_old, v_ref, x0, x_t, t, half, beta=0.5, kl_coef=0.0, negative_branch=False).item()
    # L⁺ = 0.5 and L⁻ = 5/6 (test_positive_only_drops_the_negative_term_hand_computed's case), × A_max/β = 10.
    assert both == pytest.approx(10 * (0.25 + 0.5 * 5 / 6)) and positive == pytest.approx(10 * 0.25)


@pytest.mark.parametrize("preset", [POSITIVE_BRANCH_ONLY, POSITIVE_ADVANTAGES_ONLY], ids=["branch", "advantages"])
def test_positive_only_two_iterations_through_the_loop(tiny_policy, preset):
    loop_smoke("diffusion_nft", dataclasses.replace(preset, num_steps=3), tiny_policy)
