"""The tiny DiT policy: save/load, the three weight sets, soft update, CFG."""

import dataclasses

import pytest
import torch

from harness.policies.tiny_dit import TinyDiT, TinyDiTPolicy, load_tiny_dit, save_tiny_dit
from harness.policy import guided_velocity
from tests.conftest import make_tiny_policy


def make_policy(seed: int = 0) -> TinyDiTPolicy:
    return make_tiny_policy(seed, depth=2)


def inputs(policy, batch=3):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, *policy.sample_shape, generator=g),
        torch.rand(batch, generator=g),
        policy.encode(["a red circle"] * batch),
    )


def test_save_and_load_round_trip(tmp_path):
    policy = make_policy()
    save_tiny_dit(policy.model, tmp_path / "ckpt", {"note": "test"})
    loaded = TinyDiTPolicy(load_tiny_dit(tmp_path / "ckpt"))
    x, t, _ = inputs(policy)
    with torch.no_grad():
        assert torch.equal(
            policy.velocity(x, t, policy.encode(["a red circle"] * 3)),
            loaded.velocity(x, t, loaded.encode(["a red circle"] * 3)),
        )
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_tiny_dit(tmp_path / "missing")


def test_weight_sets_start_equal_then_theta_moves_alone():
    policy = make_policy()
    x, t, _ = inputs(policy)

    def velocities():
        out = {}
        with torch.no_grad():
            for which in ("train", "old", "ref"):
                with policy.use_weights(which):
                    out[which] = policy.velocity(x, t, policy.encode(["a red circle"] * 3))
        return out

    v = velocities()
    assert torch.equal(v["train"], v["old"]) and torch.equal(v["train"], v["ref"])
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.1)
    policy.velocity(x, t, policy.encode(["a red circle"] * 3)).pow(2).mean().backward()
    optimizer.step()
    after = velocities()
    assert not torch.allclose(after["train"], v["train"])
    assert torch.equal(after["old"], v["old"]) and torch.equal(after["ref"], v["ref"])
    policy.update_old(0.0)  # hard copy θ → old
    assert torch.equal(velocities()["old"], after["train"])


def test_soft_update_interpolates_parameters():
    policy = make_policy()
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(1.0)
    old_before = policy.weight_state("old")
    theta = policy.weight_state("train")
    policy.update_old(0.25)
    old_after = policy.weight_state("old")
    for key in theta:
        assert torch.allclose(old_after[key], 0.25 * old_before[key] + 0.75 * theta[key], atol=1e-6)
    with pytest.raises(ValueError, match="eta must be in"):
        policy.update_old(1.5)
    with pytest.raises(ValueError, match="weight set"), policy.use_weights("ema"):  # type: ignore[arg-type]
        pass


def test_cfg_combines_conditional_and_unconditional():
    policy = make_policy()
    x, t, cond = inputs(policy)
    uncond = policy.encode([""] * 3)
    with torch.no_grad():
        v_c, v_u = policy.velocity(x, t, cond), policy.velocity(x, t, uncond)
        guided = guided_velocity(policy, x, t, cond, uncond, 3.0)
    assert torch.allclose(guided, v_u + 3.0 * (v_c - v_u), atol=1e-5)
    with pytest.raises(ValueError, match="unconditional"):
        guided_velocity(policy, x, t, cond, None, 3.0)


def test_tokenizer_rejects_unknown_words():
    policy = make_policy()
    with pytest.raises(ValueError, match="'teal'"):
        policy.encode(["a teal circle"])


def test_x_prediction_returns_the_velocity_through_its_clean_estimate():
    policy = make_tiny_policy(0, depth=2)
    cfg = dataclasses.replace(policy.model.cfg, prediction="x")
    model = TinyDiT(cfg)
    model.load_state_dict(policy.model.state_dict())
    x, t, cond = inputs(policy)
    with torch.no_grad():
        x0_hat = x - t.clamp(min=cfg.min_t)[:, None, None, None] * model(x, t, cond)
        raw = dataclasses.replace(cfg, prediction="v")
        network = TinyDiT(raw)
        network.load_state_dict(model.state_dict())
        assert torch.allclose(x0_hat, network(x, t, cond), atol=1e-5)
    with pytest.raises(ValueError, match="prediction"):
        dataclasses.replace(cfg, prediction="eps")


def test_the_policy_reports_and_moves_its_device():
    policy = make_policy()
    assert policy.device == torch.device("cpu") and policy.to("cpu") is policy
    assert TinyDiTPolicy(policy.model, device="cpu").device == torch.device("cpu")
    assert policy.encode(["a red circle"]).tensors["text"].device == policy.device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_every_weight_set_moves_and_the_noise_is_the_cpus():
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        cpu, gpu = make_policy(), make_policy().to("cuda")
        assert gpu.device.type == "cuda" and not torch.backends.cudnn.benchmark
        for which in ("train", "old", "ref"):
            assert all(v.device == gpu.device for v in gpu.weight_state(which).values())
        x, t, _ = inputs(cpu)
        with torch.no_grad():
            v_cpu = cpu.velocity(x, t, cpu.encode(["a red circle"] * 3))
            v_gpu = gpu.velocity(x.cuda(), t.cuda(), gpu.encode(["a red circle"] * 3))
        assert torch.allclose(v_cpu, v_gpu.cpu(), atol=1e-4)  # IEEE fp32 on both: rounding apart, no TF32
    finally:
        torch.use_deterministic_algorithms(deterministic)
