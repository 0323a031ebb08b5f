"""Throughput options of the diffusers policies on the tiny random SD3 / FLUX pipelines (CPU).

Each option is refused with a clear error when its value is bad, and, where it runs on the CPU, gives the
velocity (and LoRA gradients) of the plain policy: exactly or to float rounding for the attention kernel and
the compiled blocks, loosely for bf16. torch.compile with inductor takes minutes on the CPU even for the tiny
model, so the compiled blocks run here with dynamo's ``eager`` backend (the same tracing and guards, no code
generation), and the fallback is driven by backends that fail.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch

import harness.policies.throughput as throughput
from harness.bench.sd3_check import Brightness, FixedPrompts
from harness.optim import OptimConfig
from harness.policies.flux import FluxLoRAConfig, FluxPolicy, FluxPolicyConfig
from harness.policies.sd3 import SD3LoRAConfig, SD3Policy, SD3PolicyConfig
from harness.trainer import LoopConfig, train
from methods import METHODS
from methods.diffusion_nft import DiffusionNFTConfig

LORA = {"rank": 4, "alpha": 8.0}
PROMPTS = ["a red cube", "two blue balls", "a green cat"]


def sd3(folder: Path, **options: object) -> SD3Policy:
    """The tiny SD3 policy with a non-zero LoRA (B = 0 at init would hide the adapters from every check)."""
    options = {"resolution": 16, "dtype": "fp32", **options}
    policy = SD3Policy.from_pretrained(folder, SD3PolicyConfig(lora=SD3LoRAConfig(**LORA), **options), device="cpu")  # type: ignore[arg-type]
    return with_lora(policy)


def flux(folder: Path, **options: object) -> FluxPolicy:
    options = {"resolution": 16, "dtype": "fp32", **options}
    policy = FluxPolicy.from_pretrained(folder, FluxPolicyConfig(lora=FluxLoRAConfig(**LORA), **options), device="cpu")  # type: ignore[arg-type]
    return with_lora(policy)


def with_lora(policy):
    with torch.no_grad():
        for i, p in enumerate(policy.trainable_parameters()):
            p.copy_(torch.full_like(p, 0.01 * (i % 3 + 1)))
    return policy


def velocity_and_grads(policy, batch: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """v_θ on fixed inputs, and the LoRA gradients of mean(v²)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *policy.sample_shape, generator=g)
    t = torch.rand(batch, generator=g) * 0.9 + 0.05
    v = policy.velocity(x, t, policy.encode(PROMPTS[:batch]))
    v.square().mean().backward()
    grads = [p.grad.clone() for p in policy.trainable_parameters()]
    for p in policy.trainable_parameters():
        p.grad = None
    return v.detach(), grads


def assert_same(a, b, atol: float = 1e-5) -> None:
    (v0, g0), (v1, g1) = a, b
    assert torch.allclose(v0, v1, atol=atol)
    assert all(torch.allclose(x, y, atol=atol) for x, y in zip(g0, g1, strict=True))


# ------------------------------------------------------------------------------------------- validation
def test_attention_backend_names_are_checked_before_any_model_loads():
    with pytest.raises(
        ValueError, match=r"attention_backend must be null \(the default\) or one of diffusers' .*flash"
    ):
        SD3PolicyConfig(attention_backend="fastest")
    # SD3's processor calls torch's SDPA itself: only torch's own kernels can be chosen.
    with pytest.raises(
        ValueError, match=r"attention_backend must be one of native, _native_flash.*JointAttnProcessor2_0"
    ):
        SD3PolicyConfig(attention_backend="flash")
    assert SD3PolicyConfig(attention_backend="_native_cudnn").attention_backend == "_native_cudnn"
    assert FluxPolicyConfig(attention_backend="_native_cudnn").attention_backend == "_native_cudnn"
    if importlib.util.find_spec("flash_attn") is None:  # FLUX dispatches through diffusers, which checks the package
        with pytest.raises(ValueError, match=r"attention_backend must be a backend this machine can run.*flash-attn"):
            FluxPolicyConfig(attention_backend="flash")


# ------------------------------------------------------------------------------------------- attention
def test_sd3_attention_kernel_gives_the_same_velocity(tiny_sd3_dir):
    plain = velocity_and_grads(sd3(tiny_sd3_dir))
    math = sd3(tiny_sd3_dir, attention_backend="_native_math")
    assert math.throughput.sdpa_backend == torch.nn.attention.SDPBackend.MATH
    assert_same(plain, velocity_and_grads(math))
    assert_same(plain, velocity_and_grads(sd3(tiny_sd3_dir, attention_backend="native")), atol=0.0)


def test_flux_attention_backend_goes_through_diffusers_and_stays_in_its_model(tiny_flux_dir):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry.get_active_backend()[0]
    plain = velocity_and_grads(flux(tiny_flux_dir))
    math = flux(tiny_flux_dir, attention_backend="_native_math")
    backends = {str(p._attention_backend.value) for p in math.transformer.attn_processors.values()}
    assert backends == {"_native_math"}
    assert _AttentionBackendRegistry.get_active_backend()[0] == default  # not the process-wide default
    assert_same(plain, velocity_and_grads(math))


# ------------------------------------------------------------------------------------------- bf16 throughout
def lora_input_dtypes(policy) -> Counter:
    """The dtypes that the LoRA A matrices receive in one forward."""
    seen: Counter = Counter()
    handles = [
        module.register_forward_pre_hook(lambda _, args: seen.update([args[0].dtype]))
        for name, module in policy.transformer.named_modules()
        if name.endswith("lora_A.default")
    ]
    velocity_and_grads(policy)
    for handle in handles:
        handle.remove()
    return seen


def test_bf16_throughout_keeps_fp32_lora_masters_and_the_velocity(tiny_sd3_dir):
    reference = velocity_and_grads(sd3(tiny_sd3_dir))
    pure = sd3(tiny_sd3_dir, dtype="bf16", autocast=False)
    # Under autocast peft hands the LoRA an fp32 copy of its input; in bf16 throughout it stays bf16.
    assert set(lora_input_dtypes(sd3(tiny_sd3_dir, dtype="bf16"))) == {torch.float32}
    assert set(lora_input_dtypes(pure)) == {torch.bfloat16}
    v, grads = velocity_and_grads(pure)
    assert v.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in pure.trainable_parameters())
    assert all(g.dtype == torch.float32 for g in grads)
    v0, g0 = reference
    assert ((v - v0).norm() / v0.norm()).item() < 0.05  # bf16 rounding, not another function
    cosine = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads]),
                                                   torch.cat([g.flatten() for g in g0]), dim=0)  # fmt: skip
    assert cosine.item() > 0.99


# ------------------------------------------------------------------------------------------- compiled blocks
def test_compiled_blocks_give_the_same_velocity_for_every_weight_set(tiny_sd3_dir, monkeypatch):
    monkeypatch.setattr(throughput, "COMPILE_BACKEND", "eager")
    plain, compiled = sd3(tiny_sd3_dir), sd3(tiny_sd3_dir, compile_blocks=True)
    assert all(block._compiled_call_impl is not None for block in compiled.transformer.transformer_blocks)
    assert_same(velocity_and_grads(plain), velocity_and_grads(compiled))
    assert_same(velocity_and_grads(plain), velocity_and_grads(compiled))  # the guarded first call, then the cached one
    for which in ("old", "ref"):
        with torch.no_grad(), plain.use_weights(which), compiled.use_weights(which):
            x, t = torch.randn(2, *plain.sample_shape), torch.rand(2)
            v0 = plain.velocity(x, t, plain.encode(PROMPTS[:2]))
            assert torch.allclose(v0, compiled.velocity(x, t, compiled.encode(PROMPTS[:2])), atol=1e-5)
    assert compiled.throughput.compiled  # nothing fell back


def test_the_guarded_first_call_keeps_the_graph_of_earlier_calls(tiny_sd3_dir, monkeypatch):
    """Reward backprop (DRaFT) chains velocity calls: the backward compiled at a new call's guard must not free
    the earlier calls' graph, which the method's backward still needs."""
    monkeypatch.setattr(throughput, "COMPILE_BACKEND", "eager")
    grads = []
    for policy in (sd3(tiny_sd3_dir), sd3(tiny_sd3_dir, compile_blocks=True)):
        x, t = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(0)), torch.full((2,), 0.5)
        cond = policy.encode(PROMPTS[:2])
        v = policy.velocity(x, t, cond)
        with policy.use_weights("old"):  # a new key: its guard compiles a backward through v's graph
            v_next = policy.velocity(x - 0.5 * v, t * 0.5, cond)
        v_next.square().mean().backward()
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_the_meters_flop_count_of_a_compiled_policy_is_eagers(tiny_sd3_dir, monkeypatch):
    """Dynamo runs eagerly under FlopCounterMode (the compute meter's count), so that call guards nothing."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(throughput, "COMPILE_BACKEND", "eager")
    counts = []
    for policy in (sd3(tiny_sd3_dir), sd3(tiny_sd3_dir, compile_blocks=True)):
        x, t = torch.randn(2, *policy.sample_shape), torch.rand(2)
        with FlopCounterMode(display=False) as counter:
            policy.velocity(x, t, policy.encode(PROMPTS[:2]))
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
    assert not policy.throughput._guarded  # the first compiled call of that shape is still to be guarded


def failing_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler found")


def failing_backward_backend():
    """Compiles forward graphs (as written) and fails on the backward, which torch compiles at the first backward."""
    from torch._dynamo.backends.common import aot_autograd

    return aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=failing_backend)


@pytest.mark.parametrize("backend", [failing_backend, failing_backward_backend()], ids=["forward", "backward"])
def test_a_failing_compile_falls_back_to_eager_with_a_warning(tiny_sd3_dir, monkeypatch, backend):
    monkeypatch.setattr(throughput, "COMPILE_BACKEND", backend)
    plain, compiled = sd3(tiny_sd3_dir), sd3(tiny_sd3_dir, compile_blocks=True)
    with pytest.warns(RuntimeWarning, match=r"SD3Policy: torch.compile .* failed \(RuntimeError: no C\+\+ compiler"):
        result = velocity_and_grads(compiled)
    assert_same(velocity_and_grads(plain), result)
    assert compiled.throughput.compiled == []
    assert all(block._compiled_call_impl is None for block in compiled.transformer.transformer_blocks)


def test_flux_compiles_both_block_lists_with_its_attention_backend(tiny_flux_dir, monkeypatch):
    monkeypatch.setattr(throughput, "COMPILE_BACKEND", "eager")
    compiled = flux(tiny_flux_dir, compile_blocks=True, attention_backend="_native_math")
    blocks = [*compiled.transformer.transformer_blocks, *compiled.transformer.single_transformer_blocks]
    assert compiled.throughput.compiled == blocks
    assert_same(velocity_and_grads(flux(tiny_flux_dir)), velocity_and_grads(compiled))


# ------------------------------------------------------------------------------------------- micro-batch
@pytest.mark.parametrize("micro_batch", [3, 4])
def test_the_training_micro_batch_is_independent_of_the_group_size(tiny_sd3_dir, micro_batch):
    """``train_batch_size`` (the methods' micro-batch) sets the transformer's batch in training, whatever the
    group size: 2 prompts × 2 images in micro-batches of 3 are 3 + 1; of 4, one."""
    policy = sd3(tiny_sd3_dir)
    sizes: list[int] = []
    velocity = policy.velocity

    def recorded(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:  # θ's forwards with grad: training's
        if torch.is_grad_enabled() and policy._lora.active == "train":
            sizes.append(x.shape[0])
        return velocity(x, t, cond)

    policy.velocity = recorded  # type: ignore[method-assign]
    loop = LoopConfig(iterations=1, evaluate=False, prompts_per_iteration=2, images_per_prompt=2)
    cfg = DiffusionNFTConfig(num_steps=2, train_batch_size=micro_batch)
    benchmark = FixedPrompts(name="tiny_prompts", prompts=tuple(PROMPTS))
    train(METHODS.get("diffusion_nft"), cfg, policy, benchmark, Brightness(), loop, OptimConfig(), progress=False)
    passes = cfg.times_per_sample  # θ's forwards per micro-batch: one per training time
    assert Counter(sizes) == ({3: passes, 1: passes} if micro_batch == 3 else {4: passes})
