"""DGPO: the group loss against the official code and the paper's objective, the clip, shared noise, "old", counts.

``fixtures/dgpo_official.json`` holds fixed inputs and the outputs of the official code run on them, outside this
repository (Luo-Yihong/DGPO@01ceb4b): ``compute_group_dgpo_loss_allreduce`` in one gloo process (its all-reduce is
the identity) inside the PPO-style clip + KL block of ``scripts/train_sd3_dgpo.py``, and ``PerPromptStatTracker``.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import methods.dgpo as dgpo_module
from harness.advantages import group_advantages
from methods.dgpo import DGPO, DGPOConfig, dgpo_clip_mask, dgpo_group_weights, dgpo_loss
from methods.forward_process import flow_matching_error
from tests.methods.forward_smoke import counted, group_prompts

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "dgpo_official.json").read_text())


def tensors(case: dict) -> dict:
    return {k: torch.tensor(v) if isinstance(v, list) else v for k, v in case.items()}


@pytest.mark.parametrize("case", [tensors(c) for c in FIXTURE["cases"]], ids=["geneval", "no-clip-no-kl", "tight"])
def test_matches_the_official_code(case):
    zero = torch.zeros_like(case["target_v"])  # ℓ(v) = mean (v − target)²: x0 = 0, ε = the target
    model_v = case["model_v"].clone().requires_grad_(True)
    err = {k: flow_matching_error(v, zero, case["target_v"]) for k, v in
           (("theta", model_v), ("ref", case["ref_v"]), ("old", case["old_v"]))}  # fmt: skip
    clipped = dgpo_clip_mask(err["theta"], err["old"], case["advantages"], clip_range=case["clip_range"])
    assert torch.equal(clipped, case["should_clip"])
    policy_loss = dgpo_loss(err["theta"], err["ref"], case["advantages"], case["group_index"], beta=case["beta_dpo"],
                            clipped=clipped if case["clip_dsm"] else None)  # fmt: skip
    assert policy_loss.item() == pytest.approx(float(case["dgpo_loss"]), rel=1e-5, abs=1e-8)
    loss = policy_loss + case["kl_coef"] * ((model_v - case["ref_v"]) ** 2).mean()
    assert loss.item() == pytest.approx(float(case["loss"]), rel=1e-5, abs=1e-8)
    loss.backward()
    assert torch.allclose(model_v.grad, case["grad_model_v"], rtol=1e-4, atol=1e-7)


def test_advantages_are_the_official_per_prompt_tracker():
    adv = tensors(FIXTURE["advantages"])
    for std, global_std in (("group", "False"), ("global", "True")):
        expected = adv[f"advantages_global_std_{global_std}"].float()
        assert torch.allclose(group_advantages(adv["rewards"], adv["group_ids"], std=std), expected, atol=1e-5)


def test_gradient_is_the_group_preference_likelihood_over_beta():
    """DGPO's objective mean_g −log σ(R_θ(G⁻) − R_θ(G⁺)) with R_θ(G) = −β Σ |A|·(ℓ_θ − ℓ_ref)/G: the official
    loss has the same gradient in ℓ_θ, divided by β."""
    g = torch.Generator().manual_seed(0)
    err_ref = torch.rand(6, generator=g)
    err_theta = (err_ref + 0.1 * torch.randn(6, generator=g)).requires_grad_(True)
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.8, -1.2, 0.4])
    group_index = torch.tensor([0, 0, 0, 1, 1, 1])
    beta = 7.0
    dgpo_loss(err_theta, err_ref, advantages, group_index, beta=beta).backward()
    grad = err_theta.grad.clone()
    err_theta.grad = None
    s = beta * torch.stack([(advantages * (err_theta - err_ref))[group_index == k].sum() / 3 for k in (0, 1)])
    (-F.logsigmoid(-s)).mean().backward()
    assert torch.allclose(grad, err_theta.grad / beta, atol=1e-6)
    # θ = reference: every group weight is σ(0) = 1/2; zero advantages pass no gradient.
    assert torch.equal(dgpo_group_weights(err_ref, err_ref, advantages, group_index, beta=beta), torch.full((6,), 0.5))
    zero = err_ref.clone().requires_grad_(True)
    dgpo_loss(zero, err_ref, torch.zeros(6), group_index, beta=beta).backward()
    assert zero.grad.abs().max() == 0


def test_clip_stops_the_gradient_of_overconfident_samples_only():
    err_old = torch.full((4,), 1.0)
    err_theta = torch.tensor([0.9, 1.1, 1.1, 0.9], requires_grad=True)  # ρ = e^{0.1}, e^{−0.1}, e^{−0.1}, e^{0.1}
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    clipped = dgpo_clip_mask(err_theta, err_old, advantages, clip_range=0.05)
    assert clipped.tolist() == [True, False, True, False]  # A > 0 and ρ > 1 + ε; A ≤ 0 and ρ < 1 − ε
    dgpo_loss(err_theta, err_old, advantages, torch.tensor([0, 0, 1, 1]), beta=1.0, clipped=clipped).backward()
    assert err_theta.grad[clipped].abs().max() == 0 and (err_theta.grad[~clipped] != 0).all()


def test_update_counts_shares_noise_within_a_group_and_steps_old(tiny_policy):
    cfg = DGPOConfig(num_steps=5, trunc_steps=3, train_timesteps=2, optimizer_steps_per_iteration=2)
    method, ledger = counted(DGPO, cfg, tiny_policy)
    prompts, groups = group_prompts(2, 3)
    with ledger.phase("sampling"):
        rollout = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    assert ledger.forward["sampling"] == 6 * 5 * 2  # CFG 4.5 doubles the collection batch
    noises = []
    original = method._velocities

    def spy(x_t, t, rollout_, sel):
        noises.append((x_t - (1 - t[0]) * rollout_.x0[sel]) / t[0])
        return original(x_t, t, rollout_, sel)

    method._velocities = spy
    with ledger.phase("training"):
        logs = method.update(rollout, torch.tensor([0.1, 0.9, 0.5, 0.2, 0.4, 0.8]), torch.Generator().manual_seed(1))
    # Per sample and time: θ with gradient, the reference (KL, no CFG) and old (the clip) without.
    assert ledger.forward["training"] == 6 * 2 * 3 and ledger.backward["training"] == 6 * 2
    assert all(torch.allclose(n, n[:1].expand_as(n), atol=1e-4) for n in noises)  # one ε per group and pass
    assert not torch.allclose(noises[0][0], noises[1][0])  # fresh per pass
    # "old" took the official ema_ref steps: decay 0 after step 1 (θ₁), then 0.001 after step 2.
    assert logs["train/old_decay"] == pytest.approx(0.001)
    assert logs["train/sampled_with_old"] == 0.0 and all(k in logs for k in ("train/kl", "train/clipfrac"))


def test_old_is_the_official_ema_ref_and_sampling_switches_to_it(tiny_policy, monkeypatch):
    cfg = DGPOConfig(num_steps=5, trunc_steps=3, train_timesteps=1, optimizer_steps_per_iteration=2, switch_ema_ref=1)
    method, _ = counted(DGPO, cfg, tiny_policy, lr=1e-2)
    prompts, groups = group_prompts(2, 3)
    rollout = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    steps: list[dict] = []
    original = method._update_old

    def spy() -> float:
        theta = tiny_policy.weight_state("train")
        old_before = tiny_policy.weight_state("old")
        decay = original()
        old = tiny_policy.weight_state("old")
        for k in theta:
            assert torch.allclose(old[k], decay * old_before[k] + (1 - decay) * theta[k], atol=1e-6)
        steps.append({"decay": decay})
        return decay

    method._update_old = spy
    method.update(rollout, torch.tensor([0.1, 0.9, 0.5, 0.2, 0.4, 0.8]), torch.Generator().manual_seed(1))
    assert [s["decay"] for s in steps] == pytest.approx([0.0, 0.001])
    used = []
    monkeypatch.setattr(dgpo_module, "collect_clean", lambda *a, **kw: used.append(kw["weights"]) or rollout)
    method.collect(prompts, groups, torch.Generator().manual_seed(2))
    assert used == ["old"]  # global_step 2 > switch_ema_ref 1


def test_the_ema_reference_replaces_the_frozen_base(tiny_policy):
    cfg = DGPOConfig(num_steps=5, trunc_steps=3, train_timesteps=1, reference="old", kl_coef=0.0, clip_dsm=False)
    method, ledger = counted(DGPO, cfg, tiny_policy)
    prompts, groups = group_prompts(2, 3)
    rollout = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    with ledger.phase("training"):
        method.update(rollout, torch.tensor([0.1, 0.9, 0.5, 0.2, 0.4, 0.8]), torch.Generator().manual_seed(1))
    assert ledger.forward["training"] == 6 * 2  # θ and old only: no KL, no base reference


def test_config_checks():
    with pytest.raises(ValueError, match="trunc_steps"):
        DGPOConfig(num_steps=4)  # the default trunc_steps 4 needs schedule index 4 < num_steps
    with pytest.raises(ValueError, match="train_timesteps"):
        DGPOConfig(trunc_steps=2, train_timesteps=4)
    with pytest.raises(ValueError, match="reference must be one of"):
        DGPOConfig(reference="base")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sampler"):
        DGPOConfig(sampler="heun")
    with pytest.raises(ValueError, match="kl_cfg"):
        DGPOConfig(kl_cfg=0.5)
