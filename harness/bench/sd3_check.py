"""GPU check: DiffusionNFT and FlowGRPO iterations on SD3.5-Medium's transformer (random weights) with LoRA.

Builds the transformer from SD3.5-Medium's ``transformer/config.json`` (values below) with random
weights, SD3's VAE architecture with random weights, and random prompt embeddings of the real shapes
(CLIP-L/G 77 tokens + T5 128 tokens, width 4096; pooled 2048) instead of the three text encoders, then
runs iterations of both methods through :func:`harness.trainer.train` with :class:`SD3Policy`
(two LoRA adapters, r 32, α 64). Reports seconds per phase (sampling includes VAE decoding), peak
GPU memory, and TFLOP/s of the training phase and of a bare training forward+backward, in two units:

* **convention FLOPs**: the project's budget unit ``fwd + 2·bwd`` forwards (``harness/compute.py``)
  × the FLOPs of one forward (``torch.utils.flop_counter``). A full fine-tune's backward costs ≈ 2
  forwards (activation and weight gradients);
* **measured (real) FLOPs**: ``FlopCounterMode`` around the ``.backward()`` call itself. With a frozen
  base and LoRA, backward computes activation gradients only (plus the LoRA's tiny weight gradients),
  ≈ 1 forward, so real FLOPs are below the convention's.

FLOP counting is slow; it is done outside the timed runs (the measured iterations reuse the forward
FLOPs of the warm-up, so their sampling time does not include a counted forward).

    diffrl bench sd3-check           # H100/H200, bf16, 512 px (``diffrl bench gpu`` before the one GPU script)
    diffrl bench sd3-check --tiny    # CPU smoke run with a tiny config

The one prepared GPU run (the card's limit, both methods at several micro-batches, the tiny DiT on the GPU)
is ``diffrl bench gpu`` (:mod:`harness.bench.gpu`), which builds on this module.

The command's flags are defined with the other benchmarks' in :mod:`harness.cli`; :func:`run` takes them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import harness.compute
from harness.optim import OptimConfig
from harness.policies.sd3 import SD3LoRAConfig, SD3Policy, SD3PolicyConfig
from harness.trainer import LoopConfig, train
from harness.types import Prompt, RewardSpec
from methods.diffusion_nft import DiffusionNFT, DiffusionNFTConfig
from methods.flow_grpo import FlowGRPO, FlowGRPOConfig

log = logging.getLogger("sd3_check")

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (2.5B-parameter MMDiT-X).
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}  # fmt: skip
# stabilityai/stable-diffusion-3.5-medium, vae/config.json (the SD3 16-channel VAE, 8× downsampling).
SD3_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
    "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False,
}  # fmt: skip
SD3_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
TINY_TRANSFORMER = {**SD35_MEDIUM_TRANSFORMER, "sample_size": 16, "num_layers": 2, "num_attention_heads": 2,
                    "attention_head_dim": 16, "joint_attention_dim": 64, "caption_projection_dim": 32,
                    "pooled_projection_dim": 32, "pos_embed_max_size": 32, "dual_attention_layers": (0,)}  # fmt: skip
TINY_VAE = {**SD3_VAE, "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4}
PROMPTS = ("a photo of a red cube", "two dogs on a beach", "a clock tower at night", "a bowl of green apples")
CLIP_TOKENS = 77
CLI_KEYS = ("command", "what", "func", "verbose")  # what the diffrl parser adds to this command's flags


class RandomPromptEncoder:
    """Stand-in for the three text encoders: a fixed random embedding per prompt string (seeded by its CRC32)."""

    def __init__(self, width: int, pooled: int, t5_tokens: int) -> None:
        self.width, self.pooled, self.tokens = width, pooled, CLIP_TOKENS + t5_tokens

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled = [], []
        for prompt in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
            embeds.append(torch.randn(self.tokens, self.width, generator=g))
            pooled.append(torch.randn(self.pooled, generator=g))
        return torch.stack(embeds), torch.stack(pooled)


@dataclass(frozen=True)
class FixedPrompts:
    """A benchmark of a few fixed prompts (default: the four above; here only training prompts are used).

    Also the stand-in benchmark of ``tests/harness/policies/test_sd3.py``.
    """

    name: str = "sd3_check_prompts"
    version: str = "0"
    images_per_prompt: int = 1
    eval_seed: int = 0
    metrics: tuple[str, ...] = ("overall",)
    prompts: tuple[str, ...] = PROMPTS

    def train_prompts(self, n: int, rng: np.random.Generator) -> list[Prompt]:
        return [Prompt(self.prompts[i]) for i in rng.integers(0, len(self.prompts), size=n)]

    def eval_prompts(self) -> list[Prompt]:
        return [Prompt(p) for p in self.prompts]

    def evaluate(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> dict[str, float]:
        return {"overall": images.mean().item()}


class Brightness:
    """Mean pixel value: a stand-in reward that costs nothing (the reward phase here is ~0 s)."""

    spec = RewardSpec(name="brightness", version="0", description="mean pixel value")

    def __call__(self, images: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3)).float().cpu()


def build_policy(args: argparse.Namespace, device: torch.device) -> SD3Policy:
    """The policy of the command's flags (:func:`build_sd3_policy`)."""
    return build_sd3_policy(args.tiny, device, SD3PolicyConfig(
        resolution=args.resolution, dtype=args.dtype, vae_dtype=args.vae_dtype, max_sequence_length=args.t5_tokens,
        gradient_checkpointing=args.gradient_checkpointing, lora=SD3LoRAConfig(rank=32, alpha=64.0),
    ))  # fmt: skip


def build_sd3_policy(tiny: bool, device: torch.device, cfg: SD3PolicyConfig) -> SD3Policy:
    """SD3.5-Medium's transformer (tiny: :data:`TINY_TRANSFORMER`) and SD3's VAE with random weights, and random
    prompt embeddings of the real shapes, as an :class:`SD3Policy` with ``cfg``."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    transformer_cfg = TINY_TRANSFORMER if tiny else SD35_MEDIUM_TRANSFORMER
    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the GPU (seconds, not minutes on the CPU)
        transformer = SD3Transformer2DModel(**transformer_cfg)
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD3_VAE))
    encoder = RandomPromptEncoder(
        transformer_cfg["joint_attention_dim"], transformer_cfg["pooled_projection_dim"], cfg.max_sequence_length
    )
    return SD3Policy(transformer, vae, SD3_SCHEDULER, encoder, cfg, device=device)  # type: ignore[arg-type]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def versions() -> dict[str, str]:
    """Versions of the libraries whose kernels and loaders the numbers depend on."""
    found = {name: importlib.metadata.version(name) for name in ("diffusers", "peft", "transformers")}
    return {"torch": torch.__version__, **found, "cuda": str(torch.version.cuda)}


def fwd_bwd_tflops(policy: SD3Policy, batch: int, repeats: int) -> dict[str, float]:
    """A bare training forward+backward of ``batch`` samples: measured forward and backward FLOPs, and time.

    ``fwd_bwd_tflops_convention`` = 3 × forward (the project's fwd + 2·bwd unit);
    ``fwd_bwd_tflops_measured`` = forward + the FLOPs counted around ``.backward()``.
    """
    device = policy.device
    x = torch.randn(batch, *policy.sample_shape)
    t = torch.rand(batch)
    cond = policy.encode([PROMPTS[i % len(PROMPTS)] for i in range(batch)])
    with FlopCounterMode(display=False) as forward_counter:
        loss = policy.velocity(x, t, cond).square().mean()
    with FlopCounterMode(display=False) as backward_counter:
        loss.backward()
    forward, backward = forward_counter.get_total_flops(), backward_counter.get_total_flops()
    if not forward > 0 < backward:
        raise RuntimeError(f"FlopCounterMode counted forward={forward}, backward={backward} FLOPs; expected both > 0")
    convention, measured = 3 * forward, forward + backward
    policy.velocity(x, t, cond).square().mean().backward()  # warm-up
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        policy.velocity(x, t, cond).square().mean().backward()
    sync(device)
    seconds = (time.perf_counter() - started) / repeats
    for p in policy.trainable_parameters():
        p.grad = None
    return {
        "batch": batch,
        "fwd_bwd_seconds": seconds,
        "forward_tflops_measured": forward / 1e12,
        "backward_tflops_measured": backward / 1e12,
        "backward_over_forward": backward / forward,
        "fwd_bwd_tflops_convention": convention / 1e12,
        "fwd_bwd_tflops_measured": measured / 1e12,
        "fwd_bwd_tflop_per_s_convention": convention / seconds / 1e12,
        "fwd_bwd_tflop_per_s_measured": measured / seconds / 1e12,
    }


@contextlib.contextmanager
def known_forward_flops(flops_per_forward: float) -> Iterator[None]:
    """Within the block, the ledger takes ``flops_per_forward`` instead of counting a forward (slow) itself.

    The ledger measures the FLOPs on its first velocity call, inside the sampling phase; the warm-up
    run has measured them already, so the timed run reuses that number and its sampling time is clean.
    """
    original = harness.compute.measure_forward_flops
    harness.compute.measure_forward_flops = lambda *args: flops_per_forward  # type: ignore[assignment]
    try:
        yield
    finally:
        harness.compute.measure_forward_flops = original


def run_method(
    policy: SD3Policy, name: str, method_cls: Any, method_cfg: Any, args: argparse.Namespace,
    backward_over_forward: float,
) -> dict[str, Any]:  # fmt: skip
    """One warm-up iteration, then ``args.iterations`` measured ones (a fresh ledger) through the shared loop.

    ``backward_over_forward``: measured backward FLOPs / forward FLOPs (:func:`fwd_bwd_tflops`), which
    turns the ledger's backward count into measured FLOPs.
    """
    loop = LoopConfig(iterations=1, evaluate=False, prompts_per_iteration=args.prompts,
                      images_per_prompt=args.images_per_prompt)  # fmt: skip
    warm_up = train(method_cls, method_cfg, policy, FixedPrompts(), Brightness(), loop, OptimConfig(), progress=False,
                    label=name)  # fmt: skip
    flops_per_forward = warm_up.ledger.flops_per_forward
    if flops_per_forward is None:
        raise RuntimeError(f"{name}: the warm-up iteration made no forward, so no FLOPs were measured")
    device = policy.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loop = LoopConfig(iterations=args.iterations, evaluate=False, prompts_per_iteration=args.prompts,
                      images_per_prompt=args.images_per_prompt, seed=1)  # fmt: skip
    sync(device)
    with known_forward_flops(flops_per_forward):
        result = train(method_cls, method_cfg, policy, FixedPrompts(), Brightness(), loop, OptimConfig(),
                       progress=False, label=name)  # fmt: skip
    sync(device)
    ledger = result.ledger
    per_forward = flops_per_forward
    fwd, bwd = ledger.forward["training"], ledger.backward["training"]
    training_seconds = max(ledger.seconds["training"], 1e-9)
    sampling_flops = ledger.forward["sampling"] * per_forward
    return {
        "method": name,
        "iterations": args.iterations,
        "images_per_iteration": args.prompts * args.images_per_prompt,
        "seconds_per_iteration": {p: ledger.seconds[p] / args.iterations for p in ("sampling", "reward", "training")},
        "forwards": {p: ledger.forward[p] for p in ("sampling", "training")},
        "backwards_training": ledger.backward["training"],
        "gflops_per_sample_forward": per_forward / 1e9,
        "sampling_tflop_per_s": sampling_flops / max(ledger.seconds["sampling"], 1e-9) / 1e12,
        "training_tflop_per_s_convention": (fwd + 2 * bwd) * per_forward / training_seconds / 1e12,
        "training_tflop_per_s_measured": (fwd + backward_over_forward * bwd) * per_forward / training_seconds / 1e12,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "train_logs": {k: v for k, v in result.iterations[-1].items() if k.startswith("train/")},
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``diffrl bench sd3-check ARGV``: parse the flags as the command line does and :func:`run` them."""
    from harness.cli import build_parser

    return run(build_parser().parse_args(["bench", "sd3-check", *(argv or [])]))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the policy, time a bare forward+backward and both methods; print (and with ``--out`` write) the JSON."""
    args.resolution = args.resolution or (64 if args.tiny else 512)
    args.dtype = args.dtype or ("fp32" if args.tiny else "bf16")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    started = time.perf_counter()
    policy = build_policy(args, device)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": versions(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in CLI_KEYS},
        # The transformer's parameters include both LoRA adapters (θ and old); the base alone is the model size.
        "transformer_parameters_with_adapters": sum(p.numel() for p in policy.transformer.parameters()),
        "lora_parameters_per_adapter": sum(p.numel() for p in policy.trainable_parameters()),
        "build_seconds": time.perf_counter() - started,
    }
    report["base_transformer_parameters"] = (
        report["transformer_parameters_with_adapters"] - 2 * report["lora_parameters_per_adapter"]
    )
    report["fwd_bwd"] = fwd_bwd_tflops(policy, args.nft_batch, args.repeats)
    ratio = report["fwd_bwd"]["backward_over_forward"]
    nft = DiffusionNFTConfig(num_steps=args.steps, shift=3.0, train_batch_size=args.nft_batch)
    grpo = FlowGRPOConfig(num_steps=args.steps, shift=3.0, train_batch_size=args.grpo_batch)
    report["diffusion_nft"] = run_method(policy, "diffusion_nft", DiffusionNFT, nft, args, ratio)
    report["flow_grpo"] = run_method(policy, "flow_grpo", FlowGRPO, grpo, args, ratio)
    report["total_seconds"] = time.perf_counter() - started
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return report
