"""FluxPolicy on a tiny random FLUX.1-dev-like pipeline saved to disk and loaded back offline (fp32, CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.bench.sd3_check import Brightness, FixedPrompts
from harness.optim import OptimConfig
from harness.policies.flux import (
    FluxLoRAConfig,
    FluxPolicy,
    FluxPolicyConfig,
    PipelinePromptEncoder,
    dynamic_shift_mu,
    flux_sigmas,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from harness.policies.lora import checkpoint_ema_shadow
from harness.policy import Policy, ResumablePolicy, guided_velocity
from harness.samplers import EulerODE, flow_schedule
from harness.trainer import LoopConfig, train
from methods import METHODS
from methods.diffusion_nft import DiffusionNFTConfig
from methods.flow_grpo import FlowGRPOConfig
from tests.harness.policies.tiny_flux import build_tiny_flux_pipeline

CFG = FluxPolicyConfig(resolution=16, dtype="fp32", lora=FluxLoRAConfig(rank=4, alpha=8.0))
PROMPTS = ["a red cube", "two blue balls", "a green cat"]


def load(tiny_flux_dir: Path, cfg: FluxPolicyConfig = CFG) -> FluxPolicy:
    return FluxPolicy.from_pretrained(tiny_flux_dir, cfg, device="cpu")


def inputs(policy: FluxPolicy, seed: int = 0, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *policy.sample_shape, generator=g)
    return x, torch.rand(batch, generator=g) * 0.9 + 0.05, policy.encode(PROMPTS[:batch])


def velocities(policy: FluxPolicy, x, t, cond) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for which in ("train", "old", "ref"):
            with policy.use_weights(which):
                out[which] = policy.velocity(x, t, cond)
    return out


def raw_transformer(transformer, x, t, cond, guidance: float = 3.5) -> torch.Tensor:
    """The transformer called as FluxPipeline calls it (packed latents, t = timestep / 1000), unpacked."""
    embeds = cond.tensors["prompt_embeds"]
    with torch.no_grad():
        out = transformer(
            hidden_states=pack_latents(x), timestep=t, guidance=torch.full((x.shape[0],), guidance),
            pooled_projections=cond.tensors["pooled_prompt_embeds"], encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3), img_ids=latent_image_ids(*x.shape[2:]), return_dict=False,
        )[0]  # fmt: skip
    return unpack_latents(out, *x.shape[2:])


def one_step(policy: FluxPolicy, seed: int = 1) -> None:
    """One AdamW step on a loss of v_θ, with a ref forward between forward and backward (as the methods do)."""
    x, t, cond = inputs(policy, seed)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    v = policy.velocity(x, t, cond)
    with torch.no_grad(), policy.use_weights("ref"):
        policy.velocity(x, t, cond)
    (v**2).mean().backward()
    named = zip(policy._lora.train_names, policy.trainable_parameters(), strict=True)
    assert all(p.grad.abs().sum() > 0 for n, p in named if "lora_B" in n)  # B = 0 at init: only B's get a gradient
    optimizer.step()


def test_shapes_dtypes_lora_targets_and_the_prompt_cache(tiny_flux_dir):
    policy = load(tiny_flux_dir)
    assert isinstance(policy, Policy) and isinstance(policy, ResumablePolicy) and not policy.supports_cfg
    assert policy.sample_shape == (4, 8, 8) and policy.image_seq_len == 16  # 16 px / vae 2; 4 × 4 packed tokens
    calls: list[list[str]] = []
    encoder = policy.prompt_encoder
    policy.prompt_encoder = lambda prompts: (calls.append(list(prompts)), encoder(prompts))[1]
    cond = policy.encode([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    policy.encode(PROMPTS[:2])
    assert calls == [[PROMPTS[0], PROMPTS[1]]]  # duplicates encoded once, then served from the CPU cache
    assert cond.tensors["prompt_embeds"].shape == (3, 128, 32)  # T5 max_sequence_length × d_model
    assert cond.tensors["pooled_prompt_embeds"].shape == (3, 16)  # CLIP pooled
    assert torch.equal(cond.tensors["prompt_embeds"][0], cond.tensors["prompt_embeds"][2])
    assert all(t.device.type == "cpu" for row in policy._cache.values() for t in row)
    x, t, cond = inputs(policy)
    v = policy.velocity(x, t, cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    images = policy.decode(x)
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert all(p.dtype == torch.float32 and p.requires_grad for p in policy.trainable_parameters())
    trainable = sum(p.numel() for p in policy.transformer.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in policy.trainable_parameters())
    adapted = {n.split(".lora_")[0] for n in policy._lora.train_names}
    assert {"single_transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff_context.net.2"} <= adapted
    assert len(adapted) == 12 + 3  # the double block's 12 FlowGRPO targets + the single block's q, k, v
    assert not any("proj_mlp" in n or "single_transformer_blocks.0.proj_out" in n for n in adapted)


def test_packing_is_the_pipelines():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 12, 16, vae_scale_factor=2), x)
    assert torch.equal(latent_image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


def test_sampling_and_decoding_match_flux_pipeline(tiny_flux_dir):
    """policy.schedule + policy.velocity + Euler reproduce FluxPipeline.__call__'s latents and images."""
    from diffusers import FluxPipeline

    policy = load(tiny_flux_dir)
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    cond = policy.encode(PROMPTS[:2])
    noise = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(3))
    call = {
        "prompt_embeds": cond.tensors["prompt_embeds"], "pooled_prompt_embeds": cond.tensors["pooled_prompt_embeds"],
        "latents": pack_latents(noise), "num_inference_steps": 4, "guidance_scale": 3.5, "height": 16, "width": 16,
    }  # fmt: skip
    packed = pipe(**call, output_type="latent").images
    assert torch.equal(policy.schedule(4), pipe.scheduler.sigmas)  # the σ's the pipeline just used
    schedule, x = policy.schedule(4), noise
    with torch.no_grad(), policy.use_weights("ref"):
        for k in range(4):
            x = EulerODE().step(policy.velocity(x, schedule[k].expand(2), cond), x, schedule[k], schedule[k + 1]).x_next
    assert torch.allclose(unpack_latents(packed, 8, 8), x, atol=1e-5)
    images = pipe(**call, output_type="pt").images
    assert torch.allclose(policy.decode(x), images, atol=1e-5)


def test_schedule_is_resolution_dependent_as_the_pipelines(tiny_flux_dir):
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    policy = load(tiny_flux_dir)
    config = policy.scheduler_config
    for tokens, expected in ((256, 0.5), (1024, 0.63), (4096, 1.15)):  # 256, 512, 1024 px for FLUX.1-dev
        assert dynamic_shift_mu(tokens, config) == pytest.approx(calculate_shift(tokens), abs=1e-12)
        assert dynamic_shift_mu(tokens, config) == pytest.approx(expected)
    # The pipeline at 32 px (64 tokens) shifts less than at 16 px would not tell apart: compare 32 px directly.
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    cond = policy.encode(PROMPTS[:1])
    pipe(prompt_embeds=cond.tensors["prompt_embeds"], pooled_prompt_embeds=cond.tensors["pooled_prompt_embeds"],
         num_inference_steps=3, height=32, width=32, output_type="latent")  # fmt: skip
    assert torch.equal(flux_sigmas(config, 3, 64), pipe.scheduler.sigmas)
    assert not torch.allclose(flux_sigmas(config, 3, 64), policy.schedule(3))
    # Exponential shifting of linspace(1, 0, N + 1) is flow_schedule's shift with s = e^μ.
    assert policy.schedule_shift == pytest.approx(math.exp(dynamic_shift_mu(16, config)))
    assert torch.allclose(policy.schedule(10), flow_schedule(10, policy.schedule_shift), atol=1e-6)
    with pytest.raises(ValueError, match="num_steps"):
        policy.schedule(0)


def test_velocity_is_v_with_the_distilled_guidance(tiny_flux_dir):
    policy = load(tiny_flux_dir)
    x, t, cond = inputs(policy)
    with torch.no_grad():
        v = policy.velocity(x, t, cond)
        assert torch.allclose(v, raw_transformer(policy.transformer, x, t, cond), atol=1e-5)
        other = load(tiny_flux_dir, FluxPolicyConfig(resolution=16, dtype="fp32", lora=CFG.lora, guidance=1.0))
        assert (other.velocity(x, t, cond) - v).abs().max() > 1e-4  # the guidance embedding is used
    with pytest.raises(ValueError, match="does not support classifier-free guidance"):
        guided_velocity(policy, x, t, cond, policy.encode([""] * 3), 4.5)
    with pytest.raises(ValueError, match="guidance=None"):
        load(tiny_flux_dir, FluxPolicyConfig(resolution=16, dtype="fp32", guidance=None))
    # A transformer without a guidance embedding (FLUX.1-schnell) takes guidance=None and refuses a scale.
    schnell = build_tiny_flux_pipeline(seed=1, guidance_embeds=False)
    parts = (
        schnell.transformer,
        schnell.vae,
        dict(schnell.scheduler.config),
        PipelinePromptEncoder(schnell, 16, torch.device("cpu")),
    )
    plain = FluxPolicy(*parts, FluxPolicyConfig(resolution=16, dtype="fp32", guidance=None, lora=CFG.lora))
    x, t, cond = inputs(plain)
    assert plain.velocity(x, t, cond).shape == x.shape
    with pytest.raises(ValueError, match="set guidance=None"):
        FluxPolicy(*parts, FluxPolicyConfig(resolution=16, dtype="fp32", lora=CFG.lora))


def test_weight_sets_train_old_ref(tiny_flux_dir):
    policy = load(tiny_flux_dir)
    x, t, cond = inputs(policy)
    before = velocities(policy, x, t, cond)
    assert torch.equal(before["train"], before["ref"]) and torch.equal(before["old"], before["ref"])  # LoRA B = 0
    one_step(policy)
    after = velocities(policy, x, t, cond)
    assert (after["train"] - before["train"]).abs().max() > 1e-4
    assert torch.equal(after["ref"], before["ref"]) and torch.equal(after["old"], before["old"])
    old_before = [p.detach().clone() for p in policy._lora.old_params]
    policy.update_old(0.25)  # old ← 0.25·old + 0.75·θ
    for old, prev, theta in zip(policy._lora.old_params, old_before, policy.trainable_parameters(), strict=True):
        assert torch.allclose(old, 0.25 * prev + 0.75 * theta)
    policy.update_old(0.0)
    assert torch.equal(velocities(policy, x, t, cond)["old"], after["train"])
    assert not any(p.requires_grad for p in policy._lora.old_params)


def test_lora_save_and_load(tiny_flux_dir, tmp_path):
    from diffusers import FluxPipeline

    policy = load(tiny_flux_dir)
    one_step(policy)
    x, t, cond = inputs(policy)
    with torch.no_grad():
        v_theta = policy.velocity(x, t, cond)
    policy.save_lora(tmp_path / "theta")
    # 1. Back into a fresh policy.
    fresh = load(tiny_flux_dir)
    fresh.load_lora(tmp_path / "theta")
    assert torch.equal(velocities(fresh, x, t, cond)["train"], v_theta)
    # 2. Through diffusers' own loader (α/r = 2 must come from the file's metadata).
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.load_lora_weights(tmp_path / "theta")
    assert torch.allclose(raw_transformer(pipe.transformer, x, t, cond), v_theta, atol=1e-5)
    # 3. Given tensors (the EMA's shadow): zeros give back the base model.
    zeros = [torch.zeros_like(p) for p in policy.trainable_parameters()]
    policy.save_lora(tmp_path / "ema", tensors=zeros)
    fresh.load_lora(tmp_path / "ema", which="old")
    v = velocities(fresh, x, t, cond)
    assert torch.equal(v["old"], v["ref"]) and torch.equal(v["train"], v_theta)
    # 4. Checkpoint state (ResumablePolicy): a copy that restores θ.
    state = policy.weight_state("train")
    with torch.no_grad():
        policy.trainable_parameters()[1].add_(1.0)
    policy.load_weight_state("train", state)
    assert torch.equal(velocities(policy, x, t, cond)["train"], v_theta)
    other = load(tiny_flux_dir, FluxPolicyConfig(resolution=16, dtype="fp32", lora=FluxLoRAConfig(rank=2, alpha=8.0)))
    with pytest.raises(ValueError, match="r=4"):
        other.load_lora(tmp_path / "theta")


def test_gradient_checkpointing_and_bf16(tiny_flux_dir):
    base = load(tiny_flux_dir)
    checkpointed = load(tiny_flux_dir, FluxPolicyConfig(resolution=16, dtype="fp32", lora=CFG.lora,
                                                       gradient_checkpointing=True))  # fmt: skip
    grads = []
    for policy in (base, checkpointed):
        with torch.no_grad():  # identical non-zero LoRA in both
            for i, p in enumerate(policy.trainable_parameters()):
                p.copy_(torch.full_like(p, 0.01 * (i % 3 + 1)))
        x, t, cond = inputs(policy)
        policy.velocity(x, t, cond).square().mean().backward()
        grads.append([p.grad for p in policy.trainable_parameters()])
    for g0, g1 in zip(*grads, strict=True):
        assert torch.allclose(g0, g1, atol=1e-6)
    bf16 = load(tiny_flux_dir, FluxPolicyConfig(resolution=16, dtype="bf16", lora=CFG.lora))
    assert bf16.transformer.x_embedder.weight.dtype == torch.bfloat16 and bf16.vae.dtype == torch.float32
    x, t, cond = inputs(bf16)
    v = bf16.velocity(x, t, cond)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in bf16.trainable_parameters())


def test_config_errors_name_the_field(tiny_flux_dir):
    with pytest.raises(ValueError, match=r"resolution=14 .* 2 × vae_scale_factor = 4"):
        load(tiny_flux_dir, FluxPolicyConfig(resolution=14, dtype="fp32"))
    with pytest.raises(ValueError, match=r"FluxPolicyConfig\.dtype='fp16'.*loss scaling"):
        load(tiny_flux_dir, FluxPolicyConfig(resolution=16, dtype="fp16"))
    with pytest.raises(ValueError, match=r"FluxLoRAConfig\.target_modules"):
        load(tiny_flux_dir, FluxPolicyConfig(resolution=16, dtype="fp32", lora=FluxLoRAConfig(target_modules=("x",))))
    with pytest.raises(ValueError, match=r"FluxPolicyConfig\.max_cached_prompts"):
        load(tiny_flux_dir, FluxPolicyConfig(resolution=16, dtype="fp32", max_cached_prompts=0))


@pytest.mark.parametrize(
    ("name", "method_cfg"),
    [
        ("diffusion_nft", DiffusionNFTConfig(num_steps=3, train_batch_size=4)),
        # No CFG (guidance-distilled); check_on_policy: the first ratio is 1, rollout and training forwards agree.
        (
            "flow_grpo",
            FlowGRPOConfig(num_steps=2, rollout_cfg=1.0, train_cfg=1.0, train_batch_size=4, check_on_policy=True),
        ),  # fmt: skip
    ],
)
def test_one_iteration_through_the_trainer(tiny_flux_dir, tmp_path, name, method_cfg):
    policy = load(tiny_flux_dir)
    start = [p.detach().clone() for p in policy.trainable_parameters()]
    loop = LoopConfig(iterations=1, evaluate=False, prompts_per_iteration=2, images_per_prompt=2)
    benchmark = FixedPrompts(name="tiny_prompts", prompts=tuple(PROMPTS))
    result = train(METHODS.get(name), method_cfg, policy, benchmark, Brightness(), loop, OptimConfig(lr=1e-3), progress=False,
                   checkpoint=tmp_path / "run.pt")  # fmt: skip
    row = result.iterations[0]
    assert np.isfinite(row["train/grad_norm"]) and row["train/grad_norm"] > 0
    assert result.ledger.images["sampling"] == 4 and result.ledger.backward["training"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(start, policy.trainable_parameters(), strict=True))
    shadow = checkpoint_ema_shadow(tmp_path / "run.pt")  # the run's EMA weights, as a FLUX LoRA file
    policy.save_lora(tmp_path / "ema", tensors=shadow)
    assert len(shadow) == len(start)
