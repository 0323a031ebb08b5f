"""SD3Policy on a tiny random SD3.5-like pipeline saved to disk and loaded back offline (fp32, CPU)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from harness.bench.sd3_check import Brightness, FixedPrompts
from harness.optim import OptimConfig
from harness.policies.sd3 import SD3LoRAConfig, SD3Policy, SD3PolicyConfig, checkpoint_ema_shadow
from harness.policy import Policy, ResumablePolicy
from harness.samplers import EulerODE, flow_schedule
from harness.trainer import LoopConfig, train
from methods import METHODS
from methods.diffusion_nft import DiffusionNFTConfig
from tests.methods.forward_smoke import Redness

CFG = SD3PolicyConfig(resolution=16, dtype="fp32", lora=SD3LoRAConfig(rank=4, alpha=8.0))
PROMPTS = ["a red cube", "two blue balls", "a green cat"]


def load(tiny_sd3_dir: Path, cfg: SD3PolicyConfig = CFG) -> SD3Policy:
    return SD3Policy.from_pretrained(tiny_sd3_dir, cfg, device="cpu")


def inputs(policy: SD3Policy, seed: int = 0, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *policy.sample_shape, generator=g)
    return x, torch.rand(batch, generator=g) * 0.9 + 0.05, policy.encode(PROMPTS[:batch])


def velocities(policy: SD3Policy, x, t, cond) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for which in ("train", "old", "ref"):
            with policy.use_weights(which):
                out[which] = policy.velocity(x, t, cond)
    return out


def one_step(policy: SD3Policy, seed: int = 1) -> None:
    """One AdamW step on a loss of v_θ, with a ref forward between forward and backward (as the methods do)."""
    x, t, cond = inputs(policy, seed)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    v = policy.velocity(x, t, cond)
    with torch.no_grad(), policy.use_weights("ref"):
        policy.velocity(x, t, cond)
    (v**2).mean().backward()
    named = zip(policy._train_names, policy.trainable_parameters(), strict=True)
    dead = [n for n, p in named if "lora_B" in n and not p.grad.abs().sum() > 0]
    # B = 0 at init, so only the B's get a gradient; the last block's context queries feed no output.
    assert dead == ["transformer_blocks.1.attn.add_q_proj.lora_B.default.weight"]
    optimizer.step()


def test_shapes_dtypes_and_the_prompt_cache(tiny_sd3_dir):
    policy = load(tiny_sd3_dir)
    assert isinstance(policy, Policy)
    assert policy.sample_shape == (4, 8, 8)  # 16 px / vae factor 2, 4 latent channels
    calls: list[list[str]] = []
    encoder = policy.prompt_encoder
    policy.prompt_encoder = lambda prompts: (calls.append(list(prompts)), encoder(prompts))[1]
    cond = policy.encode([PROMPTS[0], PROMPTS[1], PROMPTS[0], ""])
    assert calls == [[PROMPTS[0], PROMPTS[1]]]  # "" was cached at start-up, duplicates are encoded once
    assert cond.tensors["prompt_embeds"].shape == (4, 77 + 128, 32)  # CLIP tokens + T5 max_sequence_length
    assert cond.tensors["pooled_prompt_embeds"].shape == (4, 16)
    assert torch.equal(cond.tensors["prompt_embeds"][0], cond.tensors["prompt_embeds"][2])
    policy.encode(PROMPTS[:2])
    assert len(calls) == 1
    x, t, cond = inputs(policy)
    v = policy.velocity(x, t, cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    images = policy.decode(x)
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert all(p.dtype == torch.float32 and p.requires_grad for p in policy.trainable_parameters())
    assert sum(p.numel() for p in policy.transformer.parameters() if p.requires_grad) == sum(
        p.numel() for p in policy.trainable_parameters()
    )


def test_prompt_cache_is_a_cpu_lru_that_keeps_the_empty_prompt(tiny_sd3_dir):
    policy = load(tiny_sd3_dir, SD3PolicyConfig(resolution=16, dtype="fp32", lora=CFG.lora, max_cached_prompts=2))
    calls: list[list[str]] = []
    encoder = policy.prompt_encoder
    policy.prompt_encoder = lambda prompts: (calls.append(list(prompts)), encoder(prompts))[1]
    a, b, c = PROMPTS
    reference = policy.encode([a, b, c])  # three new prompts in one batch: all returned, only two kept
    assert calls == [[a, b, c]] and set(policy._cache) == {"", b, c}
    assert all(t.device.type == "cpu" for pair in policy._cache.values() for t in pair)
    assert all(t.device == policy.device for t in reference.tensors.values())
    policy.encode([b])  # b becomes the most recent use, so c is the next to go
    policy.encode([a, ""])
    assert calls == [[a, b, c], [a]] and set(policy._cache) == {"", b, a}
    cond = policy.encode([c, a, b])  # a batch touches its prompts in order: a, then b, then the new c
    assert calls[-1] == [c] and set(policy._cache) == {"", b, c}
    assert torch.equal(cond.tensors["prompt_embeds"], reference.tensors["prompt_embeds"][[2, 0, 1]])
    for _ in range(3):
        policy.encode(["x", "y", "z"])
    assert "" in policy._cache and len(policy._cache) == 3
    with pytest.raises(ValueError, match="max_cached_prompts"):
        load(tiny_sd3_dir, SD3PolicyConfig(resolution=16, dtype="fp32", max_cached_prompts=0))


def test_vae_is_loaded_in_its_own_dtype(tiny_sd3_dir):
    """bf16 transformer, fp32 VAE: the VAE's weights are the file's fp32 values, not a bf16 round trip."""
    from diffusers import AutoencoderKL

    policy = load(tiny_sd3_dir, SD3PolicyConfig(resolution=16, dtype="bf16", vae_dtype="fp32", lora=CFG.lora))
    reference = AutoencoderKL.from_pretrained(tiny_sd3_dir / "vae", dtype=torch.float32).state_dict()
    weights = policy.vae.state_dict()
    assert set(weights) == set(reference)
    assert all(weights[k].dtype == torch.float32 and torch.equal(weights[k], reference[k]) for k in reference)
    assert policy.transformer.pos_embed.proj.weight.dtype == torch.bfloat16
    assert policy.prompt_encoder.pipeline.text_encoder.dtype == torch.bfloat16


def test_velocity_and_time_follow_the_diffusers_scheduler(tiny_sd3_dir):
    """x_t = (1 − t)x0 + tε is ``scale_noise``; an Euler step with v equals ``scheduler.step`` on the raw output."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    policy = load(tiny_sd3_dir)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(policy.scheduler_config)
    scheduler.set_timesteps(4)
    x0, noise = torch.randn(2, *policy.sample_shape), torch.randn(2, *policy.sample_shape)
    sigma, sigma_next = scheduler.sigmas[1], scheduler.sigmas[2]
    x_t = scheduler.scale_noise(x0, scheduler.timesteps[1:2], noise)
    assert torch.allclose(x_t, (1 - sigma) * x0 + sigma * noise, atol=1e-6)
    cond = policy.encode(PROMPTS[:2])
    with torch.no_grad():
        raw = policy.transformer(
            hidden_states=x_t, timestep=scheduler.timesteps[1].expand(2),
            encoder_hidden_states=cond.tensors["prompt_embeds"],
            pooled_projections=cond.tensors["pooled_prompt_embeds"], return_dict=False,
        )[0]  # fmt: skip
        v = policy.velocity(x_t, sigma.expand(2), cond)
    assert torch.allclose(v, raw, atol=1e-5)
    scheduler._step_index = 1
    expected = scheduler.step(raw, scheduler.timesteps[1], x_t, return_dict=False)[0]
    assert torch.allclose(EulerODE().step(v, x_t, sigma, sigma_next).x_next, expected, atol=1e-5)


def test_schedule_is_the_pipeline_schedulers(tiny_sd3_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler

    policy = load(tiny_sd3_dir)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(policy.scheduler_config)
    scheduler.set_timesteps(10)
    schedule = policy.schedule(10)
    assert schedule.shape == (11,) and schedule[0] == 1.0 and schedule[-1] == 0.0
    assert torch.equal(schedule, scheduler.sigmas)
    assert torch.allclose(schedule[:-1] * 1000, scheduler.timesteps)

    # diffusers: N σ's spaced uniformly from 1 to σ_min = shift(1/1000), shifted, then σ = 0 appended.
    def shift(s: torch.Tensor) -> torch.Tensor:
        return 3.0 * s / (1 + 2.0 * s)

    assert torch.allclose(schedule[:-1], shift(torch.linspace(1.0, shift(torch.tensor(1e-3)).item(), 10)), atol=1e-6)
    uniform = flow_schedule(10, 3.0)  # the methods' default: shift(linspace(1, 0, N + 1))
    assert uniform[-2].item() == pytest.approx(0.25)  # its last step starts at shift(1/10)
    assert schedule[-2] < 0.01  # diffusers' last step starts at ≈ 0.009
    with pytest.raises(ValueError, match="num_steps"):
        policy.schedule(0)


def test_weight_sets_train_old_ref(tiny_sd3_dir):
    policy = load(tiny_sd3_dir)
    x, t, cond = inputs(policy)
    before = velocities(policy, x, t, cond)
    assert torch.equal(before["train"], before["ref"]) and torch.equal(before["old"], before["ref"])  # LoRA B = 0
    one_step(policy)
    after = velocities(policy, x, t, cond)
    assert (after["train"] - before["train"]).abs().max() > 1e-4
    assert torch.equal(after["ref"], before["ref"]) and torch.equal(after["old"], before["old"])
    old_before = [p.detach().clone() for p in policy._old_params]
    policy.update_old(0.25)  # old ← 0.25·old + 0.75·θ
    for old, prev, theta in zip(policy._old_params, old_before, policy.trainable_parameters(), strict=True):
        assert torch.allclose(old, 0.25 * prev + 0.75 * theta)
    policy.update_old(0.0)
    assert torch.equal(velocities(policy, x, t, cond)["old"], after["train"])
    assert not any(p.requires_grad for p in policy._old_params)
    with pytest.raises(ValueError, match="weight set"):
        policy.use_weights("ema").__enter__()  # type: ignore[arg-type]


def test_lora_save_and_load(tiny_sd3_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    policy = load(tiny_sd3_dir)
    one_step(policy)
    x, t, cond = inputs(policy)
    with torch.no_grad():
        v_theta = policy.velocity(x, t, cond)
    policy.save_lora(tmp_path / "theta")
    # 1. Back into a fresh policy.
    fresh = load(tiny_sd3_dir)
    fresh.load_lora(tmp_path / "theta")
    assert torch.equal(velocities(fresh, x, t, cond)["train"], v_theta)
    # 2. Through diffusers' own loader (α/r = 2 must come from the file's metadata).
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.load_lora_weights(tmp_path / "theta")
    with torch.no_grad():
        v_pipe = pipe.transformer(
            hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.tensors["prompt_embeds"],
            pooled_projections=cond.tensors["pooled_prompt_embeds"], return_dict=False,
        )[0]  # fmt: skip
    assert torch.allclose(v_pipe, v_theta, atol=1e-5)
    # 3. Given tensors (the EMA's shadow): zeros give back the base model.
    zeros = [torch.zeros_like(p) for p in policy.trainable_parameters()]
    policy.save_lora(tmp_path / "ema", tensors=zeros)
    fresh.load_lora(tmp_path / "ema", which="old")
    v = velocities(fresh, x, t, cond)
    assert torch.equal(v["old"], v["ref"]) and torch.equal(v["train"], v_theta)
    with pytest.raises(ValueError, match="align"):
        policy.save_lora(tmp_path / "bad", tensors=zeros[:-1])
    # 4. Checkpoint state (ResumablePolicy): a copy that restores θ.
    assert isinstance(policy, ResumablePolicy)
    state = policy.weight_state("train")
    with torch.no_grad():
        policy.trainable_parameters()[1].add_(1.0)
    policy.load_weight_state("train", state)
    assert torch.equal(velocities(policy, x, t, cond)["train"], v_theta)
    other = load(tiny_sd3_dir, SD3PolicyConfig(resolution=16, dtype="fp32", lora=SD3LoRAConfig(rank=2, alpha=8.0)))
    with pytest.raises(ValueError, match="r=4"):
        other.load_lora(tmp_path / "theta")


def test_gradient_checkpointing_and_bf16(tiny_sd3_dir):
    base = load(tiny_sd3_dir)
    checkpointed = load(tiny_sd3_dir, SD3PolicyConfig(resolution=16, dtype="fp32", lora=CFG.lora,
                                                      gradient_checkpointing=True))  # fmt: skip
    for policy in (base, checkpointed):
        with torch.no_grad():  # identical non-zero LoRA in both
            for i, p in enumerate(policy.trainable_parameters()):
                p.copy_(torch.full_like(p, 0.01 * (i % 3 + 1)))
    grads = []
    for policy in (base, checkpointed):
        x, t, cond = inputs(policy)
        policy.velocity(x, t, cond).square().mean().backward()
        grads.append([p.grad for p in policy.trainable_parameters()])
    for g0, g1 in zip(*grads, strict=True):
        assert torch.allclose(g0, g1, atol=1e-6)
    bf16 = load(tiny_sd3_dir, SD3PolicyConfig(resolution=16, dtype="bf16", lora=CFG.lora))
    assert bf16.transformer.pos_embed.proj.weight.dtype == torch.bfloat16
    x, t, cond = inputs(bf16)
    v = bf16.velocity(x, t, cond)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in bf16.trainable_parameters())


def test_config_errors_name_the_field(tiny_sd3_dir):
    with pytest.raises(ValueError, match="resolution"):
        load(tiny_sd3_dir, SD3PolicyConfig(resolution=15, dtype="fp32"))
    with pytest.raises(ValueError, match="dtype"):
        load(tiny_sd3_dir, SD3PolicyConfig(resolution=16, dtype="fp64"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"SD3PolicyConfig\.dtype='fp16'.*loss scaling.*dtype='bf16'"):
        load(tiny_sd3_dir, SD3PolicyConfig(resolution=16, dtype="fp16"))
    with pytest.raises(ValueError, match="target_modules"):
        load(tiny_sd3_dir, SD3PolicyConfig(resolution=16, dtype="fp32", lora=SD3LoRAConfig(target_modules=("nope",))))


def tiny_prompts() -> FixedPrompts:
    """The benchmark of ``harness/bench/sd3_check.py`` on this file's three prompts."""
    return FixedPrompts(name="tiny_prompts", prompts=tuple(PROMPTS))


# Per-method settings of the one-iteration runs beyond the fewest steps and micro-batches of 4. FlowGRPO checks that
# its first training ratio is 1 (the rollout's and the training's forwards agree through the LoRA); the others only
# cut training times and windows so that 2 sampling steps are allowed (time only).
SD3_OVERRIDES: dict[str, dict[str, object]] = {
    "diffusion_nft": {"num_steps": 3},
    "flow_grpo": {"check_on_policy": True},
    "flow_grpo_fast": {"sde_window_size": 1, "sde_window_range": (0, 2)},
    "awm": {"train_timesteps": 2},
    "crd": {"train_timesteps": 2},
    "dgpo": {"trunc_steps": 1, "train_timesteps": 2},
}


def one_iteration_config(name: str) -> object:
    """``name``'s default config with the fewest sampling steps its own checks allow (2, else 3 or 4), micro-batches
    of 4 where it has them, then its SD3_OVERRIDES."""
    config_cls = METHODS.get(name).Config
    fields = {f.name for f in dataclasses.fields(config_cls)}
    settings = {**({"train_batch_size": 4} if "train_batch_size" in fields else {}), **SD3_OVERRIDES.get(name, {})}
    for steps in (2, 3, 4):
        try:
            return config_cls(**{"num_steps": steps, **settings})
        except ValueError:  # too few steps for this method (e.g. its SDE window)
            continue
    return config_cls(**settings)


@pytest.mark.parametrize("name", METHODS.keys())
def test_one_iteration_of_every_method_through_the_trainer(tiny_sd3_dir, name):
    """Every registered method trains the LoRA for one iteration: a finite loss, LoRA B moved off 0, counters agree."""
    method_cls = METHODS.get(name)
    policy = load(tiny_sd3_dir)
    loop = LoopConfig(iterations=1, evaluate=False, prompts_per_iteration=2, images_per_prompt=2)
    reward = Redness() if method_cls.capabilities.needs_differentiable_reward else Brightness()
    result = train(method_cls, one_iteration_config(name), policy, tiny_prompts(), reward, loop, OptimConfig(lr=1e-3),
                   progress=False)  # fmt: skip
    row, ledger = result.iterations[0], result.ledger
    train_logs = {k: v for k, v in row.items() if k.startswith("train/")}
    assert {"train/loss", "train/policy_loss"} & train_logs.keys(), sorted(train_logs)
    assert all(math.isfinite(v) for v in train_logs.values()), train_logs
    assert row["train/grad_norm"] > 0
    # LoRA B starts at 0 and only a gradient moves it (AdamW's weight decay keeps 0 at 0)
    named = zip(policy._train_names, policy.trainable_parameters(), strict=True)
    assert any(p.abs().sum() > 0 for n, p in named if "lora_B" in n), f"{name}: no LoRA B moved"
    assert ledger.images["sampling"] == 4 and ledger.forward["sampling"] > 0 and ledger.forward["sampling"] % 4 == 0
    assert 0 < ledger.backward["training"] <= ledger.forward["training"]
    assert ledger.forward["eval"] == 0 and row["compute/fwd_equiv"] == ledger.fwd_equiv


def test_ema_weights_from_a_run_checkpoint(tiny_sd3_dir, tmp_path, monkeypatch):
    """train() keeps the EMA only in its checkpoint (optim → ema → shadow); the helper turns it into a LoRA file."""
    import harness.trainer

    policy = load(tiny_sd3_dir)
    loop = LoopConfig(iterations=1, evaluate=False, prompts_per_iteration=2, images_per_prompt=2)
    saved = {}
    save = harness.trainer.save_checkpoint

    def spy(path, state, policy_, optim, *args, **kwargs):  # the optimisation object that train() does not return
        saved["shadow"] = [s.clone() for s in optim.ema.shadow]
        save(path, state, policy_, optim, *args, **kwargs)

    monkeypatch.setattr(harness.trainer, "save_checkpoint", spy)
    train(METHODS.get("diffusion_nft"), DiffusionNFTConfig(num_steps=2, train_batch_size=4), policy, tiny_prompts(),
          Brightness(), loop, OptimConfig(lr=1e-2), progress=False, checkpoint=tmp_path / "run.pt")  # fmt: skip
    shadow = checkpoint_ema_shadow(tmp_path / "run.pt")
    assert all(torch.equal(a, b) for a, b in zip(shadow, saved["shadow"], strict=True))
    assert any(s.abs().sum() > 0 for s in shadow[1::2])  # lora_B moved away from 0
    policy.save_lora(tmp_path / "ema", tensors=shadow)
    fresh = load(tiny_sd3_dir)
    fresh.load_lora(tmp_path / "ema")
    assert all(torch.equal(a, b) for a, b in zip(fresh.trainable_parameters(), shadow, strict=True))
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="optim → ema → shadow"):
        checkpoint_ema_shadow(tmp_path / "other.pt")


def test_gpu_check_script_runs_tiny_on_cpu(monkeypatch):
    import harness.compute
    from harness.bench.sd3_check import main

    counted = []
    measure = harness.compute.measure_forward_flops
    monkeypatch.setattr(harness.compute, "measure_forward_flops", lambda *a: counted.append(1) or measure(*a))
    report = main(["--tiny", "--device", "cpu", "--steps", "3", "--prompts", "2", "--images-per-prompt", "2",
                   "--repeats", "1", "--resolution", "32"])  # fmt: skip
    nft = report["diffusion_nft"]
    # 3 sampling steps × 4 images; training: int(3·0.99) = 2 times × 4 samples × (old, θ, ref), θ backpropagated.
    assert nft["forwards"] == {"sampling": 12, "training": 24} and nft["backwards_training"] == 8
    grpo = report["flow_grpo"]
    # CFG 4.5 doubles every call: sampling 3 × 8; training 2 steps × 4 samples × 2 (θ and ref) × 2.
    assert grpo["forwards"] == {"sampling": 24, "training": 32} and grpo["backwards_training"] == 16
    # The ledger counted a forward's FLOPs in each warm-up only: the timed runs' sampling phases hold no counting.
    assert len(counted) == 2 and harness.compute.measure_forward_flops is not measure  # (monkeypatch restores it)
    fwd_bwd = report["fwd_bwd"]
    assert fwd_bwd["fwd_bwd_tflops_convention"] == pytest.approx(3 * fwd_bwd["forward_tflops_measured"])
    # Frozen base + LoRA: backward = activation gradients (≈ 1 forward), not the convention's 2.
    assert 0.8 < fwd_bwd["backward_over_forward"] < 1.5
    assert fwd_bwd["fwd_bwd_tflops_measured"] < fwd_bwd["fwd_bwd_tflops_convention"]
    assert nft["training_tflop_per_s_measured"] < nft["training_tflop_per_s_convention"]
    assert set(report["versions"]) >= {"torch", "diffusers", "peft", "transformers"}
    lora = report["lora_parameters_per_adapter"]
    assert report["base_transformer_parameters"] == report["transformer_parameters_with_adapters"] - 2 * lora
