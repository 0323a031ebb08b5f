"""CRD: the loss against the author's port, the paper's centring identity, the snapshots, times and counts.

``fixtures/crd_official.json`` holds fixed inputs and the outputs of the CRD code of X-GenGroup/Flow-Factory@a0b2bc5
(``src/flow_factory/trainers/crd.py``, added by the paper's first author) run on them outside this repository:
``compute_decay``, ``CRDTrainer._compute_crd_loss`` and the implicit-reward / normalisation / loss / KL block of
``optimize`` in one process (gather is the identity), so the centring set is the whole batch.
"""

import json
from pathlib import Path

import pytest
import torch

from methods.crd import (
    CRD,
    CRDConfig,
    ParameterSnapshot,
    crd_loss,
    decay_at,
    implicit_reward,
    reward_adaptive_kl,
)
from tests.methods.forward_smoke import counted, group_prompts

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "crd_official.json").read_text())


def tensors(case: dict) -> dict:
    return {k: torch.tensor(v) if isinstance(v, list) else v for k, v in case.items()}


CASES = [tensors(c) for c in FIXTURE["cases"]]


@pytest.mark.parametrize("case", CASES, ids=["default", "bce-plain", "softmax", "hard-beta2", "no-kl"])
def test_matches_the_official_code(case):
    zero = torch.zeros_like(case["v_target"])  # u = ε − x0 with x0 = 0, ε = the target
    v_theta = case["v_theta"].clone().requires_grad_(True)
    r_theta = implicit_reward(v_theta, case["old_v"], zero, case["v_target"], adaptive=case["adaptive"])
    assert torch.allclose(r_theta, case["r_theta"], rtol=1e-5, atol=1e-6)
    a = 0.5 + case["advantages"].clamp(-5, 5) / 10  # what methods.diffusion_nft.optimality_probability computes
    assert torch.allclose(a, case["adv_normalized"])
    policy_loss = crd_loss(r_theta, a, beta=case["crd_beta"], loss_type=case["loss_type"],
                           weight_temp=case["weight_temp"]) * 5.0 / case["crd_beta"]  # fmt: skip
    assert policy_loss.item() == pytest.approx(float(case["policy_loss"]), rel=1e-5)
    kl = ((v_theta - case["ref_v"]) ** 2).mean(dim=(1, 2, 3))
    plain = case["kl_beta"] * kl.mean()
    kl_loss = reward_adaptive_kl(kl, a, kl_coef=case["kl_beta"]) if case["adaptive_kl"] else plain
    assert kl_loss.item() == pytest.approx(float(case["kl_loss"]), rel=1e-5, abs=1e-9)
    (policy_loss + kl_loss).backward()
    assert torch.allclose(v_theta.grad, case["grad_v_theta"].float(), rtol=1e-4, atol=1e-6)


def test_decay_schedules_are_the_official_ones():
    for spec, expected in FIXTURE["decays"].items():
        start, value, slope, end = (float(x) for x in spec.split("-"))
        decays = [decay_at(step, (int(start), value, slope, end)) for step in FIXTURE["decay_steps"]]
        assert decays == pytest.approx(expected)
    assert decay_at(0, CRDConfig().old_decay) == 0.25 and decay_at(74, CRDConfig().sampler_decay) == 0.0


def test_within_prompt_centring_cancels_the_prompt_normaliser():
    """The paper's key identity: r = β·log(p*/p_ref) + β·log Z(c), and a prompt-dependent constant (Z(c) in
    the implicit reward, a reward offset per prompt) leaves the group-centred loss and its gradient unchanged."""
    g = torch.Generator().manual_seed(0)
    r_theta = torch.randn(6, generator=g).requires_grad_(True)
    a = torch.rand(6, generator=g)
    group_index = torch.tensor([0, 0, 0, 1, 1, 1])
    offset = torch.tensor([3.0, 3.0, 3.0, -2.0, -2.0, -2.0])
    for loss_type, weight_temp in (("mse", -1.0), ("bce", -1.0), ("mse", 0.5)):
        base = crd_loss(r_theta, a, group_index, beta=2.0, loss_type=loss_type, weight_temp=weight_temp)
        (grad,) = torch.autograd.grad(base, r_theta)
        shifted = crd_loss(r_theta + offset, a + 0.1 * offset, group_index, beta=2.0, loss_type=loss_type,
                           weight_temp=weight_temp)  # fmt: skip
        (grad_shifted,) = torch.autograd.grad(shifted, r_theta)
        assert shifted.item() == pytest.approx(base.item(), rel=1e-5) and torch.allclose(grad, grad_shifted, atol=1e-6)
    # Centring over the whole batch (the port's rule) does not cancel it.
    assert crd_loss(r_theta + offset, a, beta=2.0).item() != pytest.approx(crd_loss(r_theta, a, beta=2.0).item())
    # At the optimum β·R_θc = R_c the MSE loss and its gradient vanish; θ = old gives r_θ = 0.
    optimum = ((a - a.mean()) / 2.0).requires_grad_(True)
    loss = crd_loss(optimum, a, beta=2.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12) and optimum.grad.abs().max() < 1e-7
    v, x0, noise = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    assert torch.equal(implicit_reward(v, v, x0, noise), torch.zeros(3))


def test_reward_adaptive_kl_interpolates_from_the_floor_to_kl_coef():
    kl = torch.tensor([2.0, 2.0])
    assert reward_adaptive_kl(kl, torch.tensor([0.0, 0.0]), kl_coef=0.1).item() == pytest.approx(2e-4)
    assert reward_adaptive_kl(kl, torch.tensor([1.0, 1.0]), kl_coef=0.1).item() == pytest.approx(0.2)


def test_parameter_snapshot_blends_swaps_and_restores(tiny_policy):
    params = tiny_policy.trainable_parameters()
    snapshot = ParameterSnapshot(params)
    theta = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    snapshot.blend(0.25)  # θ_s = 0.25·θ₀ + 0.75·(θ₀ + 1) = θ₀ + 0.75
    with snapshot.swapped_in():
        assert all(torch.allclose(p, t + 0.75) for p, t in zip(params, theta, strict=True))
    assert all(torch.allclose(p, t + 1.0) for p, t in zip(params, theta, strict=True))
    restored = ParameterSnapshot(params)
    restored.load_state_dict(snapshot.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.tensors, snapshot.tensors, strict=True))
    snapshot.blend(1.0)  # decay 1 keeps θ_s; decay 0 copies θ
    assert all(torch.allclose(s, t + 0.75) for s, t in zip(snapshot.tensors, theta, strict=True))
    snapshot.blend(0.0)
    assert all(torch.equal(s, p) for s, p in zip(snapshot.tensors, params, strict=True))


def test_training_times_are_stratified_schedule_steps(tiny_policy):
    method, _ = counted(CRD, CRDConfig(num_steps=10, train_timesteps=20), tiny_policy)
    times = torch.cat([method.training_times(torch.Generator().manual_seed(s)) for s in range(20)])
    steps = method.schedule[:-1]
    assert torch.isin(times, steps).all() and (times == 1.0).any()  # t = 1 may be drawn ("discrete")
    assert not (times == steps[-1]).any()  # the official truncated strata never reach the last step
    narrow, _ = counted(CRD, CRDConfig(num_steps=10, train_timesteps=4, timestep_fraction=0.5), tiny_policy)
    assert (narrow.training_times(torch.Generator().manual_seed(0)) >= 0.5 - 1e-6).all()


def test_update_counts_samples_with_the_snapshot_and_blends_old(tiny_policy):
    cfg = CRDConfig(num_steps=4, train_timesteps=2, optimizer_steps_per_iteration=2)
    method, ledger = counted(CRD, cfg, tiny_policy)
    prompts, groups = group_prompts(2, 3)
    with ledger.phase("sampling"):
        rollout = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    assert ledger.forward["sampling"] == 6 * 4  # CFG-free collection
    old_before, theta_before = tiny_policy.weight_state("old"), tiny_policy.weight_state("train")
    with ledger.phase("training"):
        logs = method.update(rollout, torch.tensor([0.1, 0.9, 0.5, 0.2, 0.4, 0.8]), torch.Generator().manual_seed(1))
    # Per sample and time: θ with gradient, old, and the KL anchor with CFG 4.5 (two) without.
    assert ledger.forward["training"] == 6 * 2 * 4 and ledger.backward["training"] == 6 * 2
    assert logs["train/old_decay"] == pytest.approx(0.25 + 0.005 * 2) and logs["train/sampler_decay"] == 0.0
    old, theta = tiny_policy.weight_state("old"), tiny_policy.weight_state("train")
    decay = logs["train/old_decay"]
    assert all(torch.allclose(old[k], decay * old_before[k] + (1 - decay) * theta[k], atol=1e-6) for k in old)
    assert any(not torch.equal(theta[k], theta_before[k]) for k in theta)
    # Before step 75 the sampling model follows θ: decay 0 copies it.
    assert all(torch.equal(s, p) for s, p in zip(method.sampling_model.tensors, tiny_policy.trainable_parameters(),
                                                 strict=True))  # fmt: skip
    assert method.state_dict()["sampling_model"]["tensors"][0].shape == method.sampling_model.tensors[0].shape


def test_collection_uses_the_sampling_model_and_leaves_theta(tiny_policy):
    method, _ = counted(CRD, CRDConfig(num_steps=3), tiny_policy)
    prompts, groups = group_prompts(1, 2)
    before = tiny_policy.weight_state("train")
    with torch.no_grad():
        for p in tiny_policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))  # θ moves on; θ_s is still θ₀
    x0 = method.collect(prompts, groups, torch.Generator().manual_seed(3)).x0
    moved = tiny_policy.weight_state("train")
    tiny_policy.load_weight_state("train", before)
    expected = method.collect(prompts, groups, torch.Generator().manual_seed(3)).x0
    assert torch.equal(x0, expected)  # sampled with θ₀ = θ_s
    tiny_policy.load_weight_state("train", moved)
    assert all(torch.equal(moved[k], tiny_policy.weight_state("train")[k]) for k in moved)


def test_config_checks():
    with pytest.raises(ValueError, match="old_decay"):
        CRDConfig(old_decay=(0, 1.5, 0.0, 1.0))
    with pytest.raises(ValueError, match="kl_cfg"):
        CRDConfig(kl_cfg=0.5)
    with pytest.raises(ValueError, match="weight_temp"):
        CRDConfig(weight_temp=float("nan"))
    with pytest.raises(ValueError, match="centering must be one of"):
        CRDConfig(centering="prompt")  # type: ignore[arg-type]
