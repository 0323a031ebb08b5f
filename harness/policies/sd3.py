"""Stable Diffusion 3 / 3.5 (diffusers ``StableDiffusion3Pipeline`` components) as a :class:`~harness.policy.Policy`.

What it wraps, and where each convention comes from:

* **Velocity.** diffusers' ``FlowMatchEulerDiscreteScheduler`` noises as ``x_σ = σ·ε + (1 − σ)·x0``
  (``scale_noise``) and steps ``x_next = x + (σ_next − σ)·model_output`` (``step``), so the SD3
  transformer's output is ``dx/dσ = ε − x0``: the project's ``v`` with ``t = σ``, no sign flip
  (checked in ``tests/harness/policies/test_sd3.py``). The transformer is called with
  ``timestep = σ·num_train_timesteps`` (= 1000·t), as ``StableDiffusion3Pipeline.__call__`` does;
  that scale never leaves this file.
* **Prompts.** ``StableDiffusion3Pipeline.encode_prompt``: CLIP-L and CLIP-G penultimate hidden
  states (77 tokens) concatenated and zero-padded to T5's width, then T5-XXL's (``max_sequence_length``
  128, as DiffusionNFT/FlowGRPO's ``train_*_sd3.py``), plus both CLIPs' pooled projections. Text
  encoders are frozen, so prompt embeddings are cached on the CPU (least recently used first out beyond
  ``max_cached_prompts``) and each batch is moved to the device; the empty prompt, CFG's negative prompt
  as the official code uses it, is encoded at start-up and never evicted.
* **Weights.** One transformer with two peft LoRA adapters, ``default`` (θ, trained) and ``old``
  (the sampling policy), and the base model with adapters disabled as the reference, as the
  official DiffusionNFT code (``train_nft_sd3.py``). LoRA r = 32, α = 64, gaussian init, joint
  attention projections only (reference notes §4 / FlowGRPO §1.5). Frozen weights are kept in
  ``dtype``; the LoRA parameters are fp32 master weights and the forward runs under autocast (with
  ``autocast=False``, in ``dtype`` throughout: ``harness/policies/throughput.py``).
  ``dtype="fp16"`` is refused: the shared optimizer has no loss scaling (the official SD3 runs use
  fp16 autocast with a ``GradScaler``); bf16 needs none. Deviation: bf16, not the official fp16.
* **EMA weights** of a finished run live in its checkpoint (``optim → ema → shadow``);
  :func:`checkpoint_ema_shadow` reads them for :meth:`SD3Policy.save_lora`.
* **Decoding.** ``latents / scaling_factor + shift_factor`` through the VAE, then ``[−1, 1] → [0, 1]``
  (``StableDiffusion3Pipeline.__call__`` and ``VaeImageProcessor.postprocess``).
* **Throughput options** (``compile_blocks``, ``attention_backend``, ``autocast``; ``harness/policies/throughput.py``):
  how the transformer's forward runs, not what it computes. The training micro-batch is each method's
  ``train_batch_size``.
* **Schedule.** :meth:`SD3Policy.schedule` returns the pipeline scheduler's own σ grid (shift 3 for
  SD3.5), which differs from :func:`harness.samplers.flow_schedule` in the last steps; see ``docs/sd3.md``.

The LoRA adapters and files, the prompt cache and the VAE decode are shared with ``flux.py`` through
``harness/policies/lora.py``.

Inputs of :meth:`~SD3Policy.velocity` and :meth:`~SD3Policy.decode` may live on any device: they are moved
to the model's device and the result comes back on the input's device, in fp32, so methods that keep
latents and sampler math on the CPU work unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from harness.policies.lora import (
    DTYPES,
    OLD_ADAPTER,
    TRAIN_ADAPTER,
    DTypeName,
    LoRAAdapters,
    PromptCache,
    checkpoint_ema_shadow,
    decode_latents,
    peft_lora_config,
    place,
    resolve_dtype,
    train_dtype,
)
from harness.policies.throughput import SD3_ATTENTION_PROCESSOR, ThroughputOptions, check_attention_backend
from harness.policy import Cond, WeightSet

log = logging.getLogger(__name__)

# DTYPES, the adapter names and checkpoint_ema_shadow live in harness/policies/lora.py and stay importable from here.
__all__ = [
    "DEFAULT_MODEL", "DTYPES", "JOINT_ATTENTION_TARGETS", "OLD_ADAPTER", "TRAIN_ADAPTER", "DTypeName",
    "PipelinePromptEncoder", "PromptEncoder", "SD3LoRAConfig", "SD3Policy", "SD3PolicyConfig",
    "checkpoint_ema_shadow", "scheduler_sigmas",
]  # fmt: skip

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
# The joint-attention projections of the MMDiT blocks (official DiffusionNFT/FlowGRPO targets). The ``attn.``
# prefix matters: peft matches suffixes, and plain ``to_q`` would also adapt SD3.5's extra ``attn2`` layers.
JOINT_ATTENTION_TARGETS: tuple[str, ...] = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)  # fmt: skip
# (prompts) -> (prompt_embeds (B, L, D), pooled_prompt_embeds (B, P)); text encoders are frozen.
PromptEncoder = Callable[[list[str]], tuple[Tensor, Tensor]]


@dataclass(frozen=True, kw_only=True)
class SD3LoRAConfig:
    """The LoRA put on the transformer, for θ and the old policy alike (official: r 32, α 64, gaussian)."""

    rank: int = 32  # r
    alpha: float = 64.0  # lora_alpha; the update is scaled by alpha / rank
    target_modules: tuple[str, ...] = JOINT_ATTENTION_TARGETS
    init_lora_weights: Literal["gaussian", True] = "gaussian"  # B = 0 either way: θ starts at the base model

    def peft_config(self) -> Any:
        """The peft ``LoraConfig`` of these settings (no dropout)."""
        return peft_lora_config(self)


@dataclass(frozen=True, kw_only=True)
class SD3PolicyConfig:
    """How the adapter runs the pipeline's components."""

    resolution: int = 512  # image side in pixels; latents are resolution / vae_scale_factor
    dtype: DTypeName = "bf16"  # frozen transformer and text encoders; also the autocast dtype
    vae_dtype: DTypeName = "fp32"  # the official code decodes in fp32
    max_sequence_length: int = 128  # T5 tokens (official DiffusionNFT/FlowGRPO value)
    gradient_checkpointing: bool = False
    decode_batch_size: int = 8
    # Prompt embeddings kept on the CPU (≈1.7 MB each in bf16 at 128 T5 tokens); least recently used
    # prompts are dropped beyond this many ("" is always kept). None: no limit. 4096 ≈ 7 GB of host memory
    # and holds every eval set here (the largest, Pick-a-Pic's test split, has 2048 prompts).
    max_cached_prompts: int | None = 4096
    lora: SD3LoRAConfig = SD3LoRAConfig()
    # Throughput options (harness/policies/throughput.py, docs/sd3.md): how the forward runs; autocast also rounds.
    compile_blocks: bool = False  # torch.compile each transformer block ("regional"); eager fallback with a warning
    attention_backend: str | None = None  # SD3: native, _native_flash/_efficient/_cudnn/_math (torch SDPA)
    autocast: bool = True  # False: the transformer in ``dtype`` throughout (bf16 activations), LoRA masters still fp32

    def __post_init__(self) -> None:
        check_attention_backend(self.attention_backend, SD3_ATTENTION_PROCESSOR)


def scheduler_sigmas(scheduler_config: dict[str, Any], num_steps: int) -> Tensor:
    """The σ grid (num_steps + 1,) from 1 to 0 that the pipeline's ``FlowMatchEulerDiscreteScheduler`` would use.

    A fresh scheduler is built from the config for each call, so no ``_step_index`` state is shared.
    diffusers spaces the N sampling σ's uniformly from 1 down to the shifted ``σ_min`` (≈ 0.003 for
    shift 3), shifts them, and appends σ = 0; ``flow_schedule`` instead shifts ``linspace(1, 0, N + 1)``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    if scheduler.config.use_dynamic_shifting:
        raise ValueError("scheduler uses dynamic (resolution-dependent) shifting: SD3 pipelines use a fixed shift")
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.detach().to(torch.float32, copy=True)


class PipelinePromptEncoder:
    """``StableDiffusion3Pipeline.encode_prompt`` without CFG duplication: the three text encoders."""

    def __init__(self, pipeline: Any, max_sequence_length: int, device: torch.device) -> None:
        self.pipeline, self.max_sequence_length, self.device = pipeline, max_sequence_length, device

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        return embeds, pooled


class SD3Policy:
    """:class:`harness.policy.Policy` for an SD3/SD3.5 transformer with LoRA θ / old adapters and the base as ref.

    Build it with :meth:`from_pretrained` (any diffusers model id or local folder), or from components
    (the GPU check passes random-weight parts and a stub prompt encoder).
    """

    supports_cfg = True

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        scheduler_config: dict[str, Any],
        prompt_encoder: PromptEncoder,
        cfg: SD3PolicyConfig = SD3PolicyConfig(),
        *,
        device: torch.device | str | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else next(transformer.parameters()).device
        self.dtype = train_dtype(cfg.dtype, "SD3PolicyConfig")
        self._cache = PromptCache(cfg.max_cached_prompts, "SD3PolicyConfig")  # CPU tensors, oldest use first
        self.vae_dtype = resolve_dtype(cfg.vae_dtype, "SD3PolicyConfig.vae_dtype")
        self.transformer = place(transformer, self.device, self.dtype)
        self.vae = place(vae, self.device, self.vae_dtype)
        self.scheduler_config = dict(scheduler_config)
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        self.prompt_encoder = prompt_encoder
        # diffusers' ConfigMixin.config (a FrozenDict with attribute access), typed Tensor | Module by nn.Module.
        vae_config: Any = vae.config
        transformer_config: Any = transformer.config
        self.vae_scale_factor = 2 ** (len(vae_config.block_out_channels) - 1)
        multiple = self.vae_scale_factor * transformer_config.patch_size
        if cfg.resolution % multiple:
            raise ValueError(
                f"SD3PolicyConfig.resolution={cfg.resolution} must be a multiple of vae_scale_factor × patch_size "
                f"= {multiple}; use e.g. {cfg.resolution // multiple * multiple or multiple}"
            )
        side = cfg.resolution // self.vae_scale_factor
        self.sample_shape: tuple[int, ...] = (transformer_config.in_channels, side, side)
        self._lora = LoRAAdapters(self.transformer, cfg.lora, owner="SD3Policy")
        # The adapter's parameter lists under the names the tests and earlier callers read.
        self._train_names, self._train_params, self._old_params = (
            self._lora.train_names, self._lora.train_params, self._lora.old_params,
        )  # fmt: skip
        if cfg.gradient_checkpointing:
            cast(Any, self.transformer).enable_gradient_checkpointing()  # diffusers ModelMixin method
        blocks = cast(Any, self.transformer).transformer_blocks
        self.throughput = ThroughputOptions(self.transformer, blocks, self._lora.train_params, cfg, self.dtype,
                                            self.device, owner="SD3Policy")  # fmt: skip
        self.encode([""])  # the unconditional prompt (CFG's negative prompt) is always cached

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | Path = DEFAULT_MODEL, cfg: SD3PolicyConfig = SD3PolicyConfig(), *,
        device: torch.device | str | None = None, revision: str | None = None,
    ) -> SD3Policy:  # fmt: skip
        """Load a ``StableDiffusion3Pipeline`` (hub id or local folder; honours ``HF_HUB_OFFLINE``) and wrap it."""
        from diffusers import StableDiffusion3Pipeline

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        dtype = train_dtype(cfg.dtype, "SD3PolicyConfig")
        # Each component is loaded straight into its own dtype: the VAE must not pass through bf16 on its way to fp32.
        dtypes = {"default": dtype, "vae": resolve_dtype(cfg.vae_dtype, "SD3PolicyConfig.vae_dtype")}
        pipeline = StableDiffusion3Pipeline.from_pretrained(str(path_or_id), dtype=dtypes, revision=revision)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            encoder = getattr(pipeline, name)
            if encoder is None:
                raise ValueError(f"{path_or_id}: pipeline component {name!r} is missing; SD3Policy needs all three")
            encoder.to(device).requires_grad_(False)
        encoder = PipelinePromptEncoder(pipeline, cfg.max_sequence_length, device)
        return cls(pipeline.transformer, pipeline.vae, dict(pipeline.scheduler.config), encoder, cfg, device=device)

    # ----------------------------------------------------------------------------------------- LoRA adapters
    def use_weights(self, which: WeightSet) -> AbstractContextManager[None]:
        """θ ("train": adapter ``default``), the sampling policy ("old": adapter ``old``) or the base ("ref")."""
        return self._lora.use(which)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """θ's LoRA parameters (fp32), in a fixed order (sorted names) that :meth:`save_lora` relies on."""
        return list(self._lora.train_params)

    def fully_shard(self, shard: Callable[[nn.Module], object]) -> None:
        """FSDP: shard the transformer per block, with the base weights and both LoRA adapters (the VAE and
        the text encoders stay whole on every process). Used by :func:`harness.fsdp.shard_policy`."""
        transformer: Any = self.transformer  # diffusers' SD3 transformer: block lists unseen by nn.Module's typing
        self._lora.fully_shard(shard, transformer.transformer_blocks)

    def update_old(self, eta: float) -> None:
        """``old ← η·old + (1 − η)·θ`` on the LoRA parameters; ``eta = 0`` copies θ."""
        self._lora.update_old(eta)

    # ---------------------------------------------------------------------------------------- the model
    def encode(self, prompts: Sequence[str]) -> Cond:
        """Prompt embeddings (B, 77 + max_sequence_length, D) and pooled (B, P) on the model's device.

        Embeddings are cached on the CPU, least recently used first out beyond ``cfg.max_cached_prompts``
        (``""`` is never dropped); only the batch is moved to the device.
        """
        embeds, pooled = self._cache.lookup(prompts, self.prompt_encoder)
        return Cond(
            {
                "prompt_embeds": embeds.to(self.device, non_blocking=True),
                "pooled_prompt_embeds": pooled.to(self.device, non_blocking=True),
            }
        )

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """v = ε − x0 at (x_t, t ∈ [0, 1]); the transformer sees ``timestep = 1000·t``. fp32, on x_t's device."""
        if t.ndim != 1 or t.shape[0] != x_t.shape[0]:
            raise ValueError(f"t must have shape (B,) = ({x_t.shape[0]},), got {tuple(t.shape)}")
        timestep = t.to(self.device, torch.float32) * self.num_train_timesteps
        hidden_states = x_t.to(self.device, self.dtype)

        def forward() -> Tensor:
            return self.transformer(
                hidden_states=hidden_states,
                timestep=timestep,
                encoder_hidden_states=cond.tensors["prompt_embeds"].to(self.device, self.dtype),
                pooled_projections=cond.tensors["pooled_prompt_embeds"].to(self.device, self.dtype),
                return_dict=False,
            )[0]

        out = self.throughput.run(forward, (tuple(hidden_states.shape), self._lora.active))
        return out.float().to(x_t.device)

    def decode(self, x0: Tensor) -> Tensor:
        """Latents (B, C, h, w) → images (B, 3, H, W) in [0, 1], fp32 on x0's device."""
        return decode_latents(self.vae, x0, self.device, self.vae_dtype, self.cfg.decode_batch_size)

    def schedule(self, num_steps: int) -> Tensor:
        """(num_steps + 1,) times t from 1 to 0 of the pipeline's own scheduler (SD3.5: shift 3); see ``docs/sd3.md``."""
        return scheduler_sigmas(self.scheduler_config, num_steps)

    # ---------------------------------------------------------------------------------------- LoRA files
    def lora_state_dict(
        self, which: Literal["train", "old"] = "train", tensors: Sequence[Tensor] | None = None
    ) -> dict[str, Tensor]:
        """The LoRA of θ or old with peft's adapter-free keys (``…to_q.lora_A.weight``), as diffusers saves it.

        ``tensors`` replaces θ's values, in :meth:`trainable_parameters` order (e.g. ``optim.ema.shadow``).
        """
        return self._lora.state_dict(which, tensors)

    def save_lora(
        self, directory: str | Path, which: Literal["train", "old"] = "train", tensors: Sequence[Tensor] | None = None
    ) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` that ``StableDiffusion3Pipeline.load_lora_weights`` reads.

        The peft LoRA config (rank, alpha, targets) travels in the file's metadata, so the loader scales the
        update by α/r = 2 rather than guessing α = r. Save EMA weights with ``tensors=optim.ema.shadow``, or
        ``tensors=checkpoint_ema_shadow(path)`` from a run's checkpoint.
        """
        from diffusers import StableDiffusion3Pipeline

        return self._lora.save(directory, StableDiffusion3Pipeline, which, tensors)

    def load_lora(self, directory: str | Path, which: Literal["train", "old"] = "train") -> None:
        """Load a LoRA written by :meth:`save_lora` (a diffusers SD3 LoRA file with rank/alpha metadata)."""
        from diffusers import StableDiffusion3Pipeline

        self._lora.load(directory, StableDiffusion3Pipeline, which)

    # ------------------------------------------------------------------------------ checkpoints (ResumablePolicy)
    def weight_state(self, which: WeightSet) -> dict[str, Tensor]:
        """A CPU copy of θ's or old's LoRA tensors (the base model never changes)."""
        if which == "ref":
            raise ValueError("weight set 'ref' is the frozen base model: it has no state to save")
        return self._lora.state_dict(which)

    def load_weight_state(self, which: WeightSet, state: dict[str, Tensor]) -> None:
        """Copy LoRA tensors (keys as :meth:`lora_state_dict`) into θ ("train") or old."""
        self._lora.load_state_dict(which, state)
