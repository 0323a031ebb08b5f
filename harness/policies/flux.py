"""FLUX.1 (diffusers ``FluxPipeline`` components) as a :class:`~harness.policy.Policy`, in the pattern of ``sd3.py``.

What it wraps, and where each convention comes from:

* **Velocity.** ``FluxPipeline`` steps with the same ``FlowMatchEulerDiscreteScheduler`` as SD3
  (``x_σ = σ·ε + (1 − σ)·x0``, ``x_next = x + (σ_next − σ)·model_output``), so the transformer's output is
  the project's ``v = ε − x0`` with ``t = σ`` (checked in ``tests/harness/policies/test_flux.py``).
  ``FluxPipeline.__call__`` passes ``timestep / 1000`` (= σ) and ``FluxTransformer2DModel.forward``
  multiplies ``timestep`` and ``guidance`` by 1000 itself, so the adapter hands the transformer ``t`` as it
  is; that 0–1000 scale never leaves the transformer.
* **Latent packing.** The transformer reads 2×2 patches of the latent as tokens of 4·C channels
  (``FluxPipeline._pack_latents``), with position ids ``(0, row, col)`` per patch
  (``_prepare_latent_image_ids``) and all-zero ids for the text tokens (``encode_prompt``'s ``text_ids``).
  Packing stays inside :meth:`FluxPolicy.velocity`: ``sample_shape`` is the unpacked ``(C, H, W)`` latent
  (16 × 64 × 64 at 512 px), so noise, samplers and methods see an image-shaped tensor, as with SD3.
* **Guidance distillation.** FLUX.1-dev was distilled from classifier-free guidance: the guidance scale is
  an *input* (the ``guidance`` embedding, ``FluxPolicyConfig.guidance``, 3.5 as ``FluxPipeline`` and
  FlowGRPO's FLUX configs), and one forward gives the guided velocity. ``supports_cfg`` is False: see
  :attr:`FluxPolicy.supports_cfg`.
* **Prompts.** ``FluxPipeline.encode_prompt``: CLIP-L's pooled output (B, 768) and T5-XXL's last hidden
  states (B, ``max_sequence_length``, 4096); 128 T5 tokens as FlowGRPO's ``scripts/train_flux.py``
  (``FluxPipeline``'s own default is 512). Cached on the CPU as SD3's (``harness/policies/lora.py``).
* **Weights.** θ / old LoRA adapters and the base as ref, as SD3 (``harness/policies/lora.py``). Defaults of
  FlowGRPO's ``train_flux.py``: r = 64, α = 128, gaussian init, targets ``attn.{to_q, to_k, to_v, to_out.0,
  add_q_proj, add_k_proj, add_v_proj, to_add_out}`` and ``ff.net.{0.proj, 2}``, ``ff_context.net.{0.proj, 2}``.
  peft matches name suffixes, so ``attn.to_{q,k,v}`` also adapts the single-stream blocks' attention
  (which has no ``to_out``), as in the official run; the single blocks' ``proj_mlp``/``proj_out`` are not adapted.
* **Schedule.** :meth:`FluxPolicy.schedule` reproduces ``FluxPipeline.__call__``: σ's
  ``linspace(1, 1/N, N)``, shifted by the scheduler's resolution-dependent ``mu`` (``calculate_shift`` of
  the packed image's token count), then σ = 0. For FLUX.1-dev's exponential shifting this equals
  ``flow_schedule(N, e^μ)``: :attr:`FluxPolicy.schedule_shift` (1.878 at 512 px, 3.158 at 1024 px).
* **Throughput options** (``compile_blocks``, ``attention_backend``, ``autocast``): as SD3's
  (``harness/policies/throughput.py``); FLUX's attention processors dispatch through diffusers, so every
  backend of ``set_attention_backend`` applies.
* **Precision.** bf16, as FlowGRPO's FLUX configs ("fp16 inference produces invalid images" on FLUX);
  fp16 is refused as for SD3 (no loss scaling in ``harness/optim.py``). The VAE decodes in fp32.

Inputs of :meth:`~FluxPolicy.velocity` and :meth:`~FluxPolicy.decode` may live on any device; results come
back in fp32 on the input's device, as with SD3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor, nn

from harness.policies.lora import (
    DTypeName,
    LoRAAdapters,
    PromptCache,
    decode_latents,
    peft_lora_config,
    place,
    resolve_dtype,
    train_dtype,
)
from harness.policies.throughput import FLUX_ATTENTION_PROCESSOR, ThroughputOptions, check_attention_backend
from harness.policy import Cond, WeightSet

DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"  # gated on the Hub: accept its licence and log in first
# FlowGRPO scripts/train_flux.py (``target_modules``): both attention streams and both feed-forwards of the
# double-stream blocks; the ``attn.to_{q,k,v}`` suffixes also match the single-stream blocks' attention.
FLOWGRPO_FLUX_TARGETS: tuple[str, ...] = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip
# (prompts) -> (T5 prompt_embeds (B, L, D), CLIP pooled_prompt_embeds (B, P)); text encoders are frozen.
PromptEncoder = Callable[[list[str]], tuple[Tensor, Tensor]]


@dataclass(frozen=True, kw_only=True)
class FluxLoRAConfig:
    """The LoRA put on the transformer, for θ and the old policy alike (FlowGRPO FLUX: r 64, α 128, gaussian)."""

    rank: int = 64  # r
    alpha: float = 128.0  # lora_alpha; the update is scaled by alpha / rank
    target_modules: tuple[str, ...] = FLOWGRPO_FLUX_TARGETS
    init_lora_weights: Literal["gaussian", True] = "gaussian"  # B = 0 either way: θ starts at the base model

    def peft_config(self) -> Any:
        """The peft ``LoraConfig`` of these settings (no dropout)."""
        return peft_lora_config(self)


@dataclass(frozen=True, kw_only=True)
class FluxPolicyConfig:
    """How the adapter runs the pipeline's components (fields shared with ``SD3PolicyConfig`` mean the same)."""

    resolution: int = 512  # image side in pixels (FlowGRPO's FLUX configs); latents are resolution / vae_scale_factor
    dtype: DTypeName = "bf16"  # frozen transformer and text encoders; also the autocast dtype
    vae_dtype: DTypeName = "fp32"  # the official code decodes in fp32
    max_sequence_length: int = 128  # T5 tokens (FlowGRPO train_flux.py; FluxPipeline's default is 512)
    # The distilled guidance scale fed to the transformer's guidance embedding (FLUX.1-dev: 3.5, FluxPipeline's
    # default and FlowGRPO's / DanceGRPO's); None for a transformer without one (guidance_embeds=False, schnell).
    guidance: float | None = 3.5
    gradient_checkpointing: bool = False
    decode_batch_size: int = 8
    # Prompt embeddings kept on the CPU (≈1 MB each in bf16 at 128 T5 tokens); least recently used prompts are
    # dropped beyond this many ("" is always kept). None: no limit.
    max_cached_prompts: int | None = 4096
    lora: FluxLoRAConfig = FluxLoRAConfig()
    # Throughput options (harness/policies/throughput.py, docs/sd3.md): how the forward runs; autocast also rounds.
    compile_blocks: bool = False  # torch.compile each transformer block ("regional"); eager fallback with a warning
    attention_backend: str | None = None  # diffusers' set_attention_backend (e.g. native, flash, _native_cudnn)
    autocast: bool = True  # False: the transformer in ``dtype`` throughout (bf16 activations), LoRA masters still fp32

    def __post_init__(self) -> None:
        check_attention_backend(self.attention_backend, FLUX_ATTENTION_PROCESSOR)


def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, H, W) → (B, H/2 · W/2, 4C): 2×2 patches as tokens, row-major (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, h/2 · w/2, 4C) → (B, C, h, w) for an ``height × width`` latent (``FluxPipeline._unpack_latents``)."""
    b, _, d = tokens.shape
    patches = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int) -> Tensor:
    """(h/2 · w/2, 3) rotary position ids ``(0, row, col)`` of the packed tokens (``_prepare_latent_image_ids``)."""
    rows = torch.arange(height // 2).repeat_interleave(width // 2)
    cols = torch.arange(width // 2).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()


def dynamic_shift_mu(image_seq_len: int, scheduler_config: dict[str, Any]) -> float:
    """μ of ``FluxPipeline``'s ``calculate_shift``: linear in the token count, base_shift → max_shift.

    0.5 at 256 tokens (256 px) and 1.15 at 4096 (1024 px) with FLUX.1-dev's scheduler config.
    """
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return base_shift + slope * (image_seq_len - base_len)


def flux_sigmas(scheduler_config: dict[str, Any], num_steps: int, image_seq_len: int) -> Tensor:
    """The σ grid (num_steps + 1,) from 1 to 0 that ``FluxPipeline.__call__`` sets for ``image_seq_len`` tokens.

    A fresh ``FlowMatchEulerDiscreteScheduler`` per call (no shared ``_step_index``), given the pipeline's
    ``sigmas = linspace(1, 1/N, N)`` and ``mu``; it shifts them (``time_shift``) and appends σ = 0.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=dynamic_shift_mu(image_seq_len, scheduler_config))
    return scheduler.sigmas.detach().to(torch.float32, copy=True)


class PipelinePromptEncoder:
    """``FluxPipeline.encode_prompt``: T5 token embeddings and CLIP's pooled vector (``text_ids`` are zeros)."""

    def __init__(self, pipeline: Any, max_sequence_length: int, device: torch.device) -> None:
        self.pipeline, self.max_sequence_length, self.device = pipeline, max_sequence_length, device

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        return embeds, pooled


class FluxPolicy:
    """:class:`harness.policy.Policy` for a FLUX.1 transformer with LoRA θ / old adapters and the base as ref.

    Build it with :meth:`from_pretrained` (any diffusers FLUX model id or local folder), or from components.
    """

    # FLUX.1-dev is guidance-distilled: it was trained to produce the guided velocity in one forward from the
    # guidance embedding, not on empty-prompt unconditional branches, so true CFG (v_u + w·(v_c − v_u) with
    # encode([""])) is not how the model is meant to run and would double every forward. DanceGRPO (``--cfg 0``)
    # and FlowGRPO's FLUX configs sample and train with the embedded guidance only; the CFG scale of a method
    # must stay 1 (guided_velocity raises otherwise) and FluxPolicyConfig.guidance sets the distilled scale.
    supports_cfg = False

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        scheduler_config: dict[str, Any],
        prompt_encoder: PromptEncoder,
        cfg: FluxPolicyConfig = FluxPolicyConfig(),
        *,
        device: torch.device | str | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else next(transformer.parameters()).device
        self.dtype = train_dtype(cfg.dtype, "FluxPolicyConfig")
        self._cache = PromptCache(cfg.max_cached_prompts, "FluxPolicyConfig")  # CPU tensors, oldest use first
        self.vae_dtype = resolve_dtype(cfg.vae_dtype, "FluxPolicyConfig.vae_dtype")
        self.transformer = place(transformer, self.device, self.dtype)
        self.vae = place(vae, self.device, self.vae_dtype)
        self.scheduler_config = dict(scheduler_config)
        self.prompt_encoder = prompt_encoder
        # diffusers' ConfigMixin.config (a FrozenDict with attribute access), typed Tensor | Module by nn.Module.
        vae_config: Any = vae.config
        transformer_config: Any = transformer.config
        if transformer_config.patch_size != 1 or transformer_config.in_channels % 4:
            raise ValueError(
                f"{type(transformer).__name__} has patch_size={transformer_config.patch_size}, in_channels="
                f"{transformer_config.in_channels}; FluxPolicy packs 2×2 latent patches itself (patch_size 1, 4·C)"
            )
        self._check_guidance(bool(transformer_config.guidance_embeds))
        self.vae_scale_factor = 2 ** (len(vae_config.block_out_channels) - 1)
        multiple = 2 * self.vae_scale_factor  # 2×2 packing needs an even latent side
        if cfg.resolution % multiple:
            raise ValueError(
                f"FluxPolicyConfig.resolution={cfg.resolution} must be a multiple of 2 × vae_scale_factor = "
                f"{multiple} (2×2 latent packing); use e.g. {cfg.resolution // multiple * multiple or multiple}"
            )
        side = cfg.resolution // self.vae_scale_factor
        self.sample_shape: tuple[int, ...] = (transformer_config.in_channels // 4, side, side)
        self.image_seq_len = (side // 2) ** 2  # packed image tokens: what the dynamic shift depends on
        self._img_ids = latent_image_ids(side, side).to(self.device)
        self._lora = LoRAAdapters(self.transformer, cfg.lora, owner="FluxPolicy")
        if cfg.gradient_checkpointing:
            cast(Any, self.transformer).enable_gradient_checkpointing()  # diffusers ModelMixin method
        model: Any = self.transformer  # diffusers' FLUX transformer: block lists unseen by nn.Module's typing
        blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
        self.throughput = ThroughputOptions(self.transformer, blocks, self._lora.train_params, cfg, self.dtype,
                                            self.device, owner="FluxPolicy")  # fmt: skip

    def _check_guidance(self, guidance_embeds: bool) -> None:
        if guidance_embeds and self.cfg.guidance is None:
            raise ValueError(
                "FluxPolicyConfig.guidance=None, but the transformer has a guidance embedding (guidance_embeds=True, "
                "as FLUX.1-dev): set the distilled guidance scale, e.g. guidance=3.5"
            )
        if not guidance_embeds and self.cfg.guidance is not None:
            raise ValueError(
                f"FluxPolicyConfig.guidance={self.cfg.guidance}, but the transformer has no guidance embedding "
                "(guidance_embeds=False, as FLUX.1-schnell): set guidance=None"
            )

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | Path = DEFAULT_MODEL, cfg: FluxPolicyConfig = FluxPolicyConfig(), *,
        device: torch.device | str | None = None, revision: str | None = None,
    ) -> FluxPolicy:  # fmt: skip
        """Load a ``FluxPipeline`` (hub id or local folder; honours ``HF_HUB_OFFLINE``) and wrap it."""
        from diffusers import FluxPipeline

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        dtype = train_dtype(cfg.dtype, "FluxPolicyConfig")
        # Each component is loaded straight into its own dtype: the VAE must not pass through bf16 on its way to fp32.
        dtypes = {"default": dtype, "vae": resolve_dtype(cfg.vae_dtype, "FluxPolicyConfig.vae_dtype")}
        pipeline = FluxPipeline.from_pretrained(str(path_or_id), dtype=dtypes, revision=revision)
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipeline, name)
            if encoder is None:
                raise ValueError(f"{path_or_id}: pipeline component {name!r} is missing; FluxPolicy needs CLIP and T5")
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
        transformer: Any = self.transformer  # diffusers' FLUX transformer: block lists unseen by nn.Module's typing
        self._lora.fully_shard(shard, [*transformer.transformer_blocks, *transformer.single_transformer_blocks])

    def update_old(self, eta: float) -> None:
        """``old ← η·old + (1 − η)·θ`` on the LoRA parameters; ``eta = 0`` copies θ."""
        self._lora.update_old(eta)

    # ---------------------------------------------------------------------------------------- the model
    def encode(self, prompts: Sequence[str]) -> Cond:
        """T5 embeddings (B, max_sequence_length, D) and CLIP pooled (B, P) on the model's device (CPU-cached)."""
        embeds, pooled = self._cache.lookup(prompts, self.prompt_encoder)
        return Cond(
            {
                "prompt_embeds": embeds.to(self.device, non_blocking=True),
                "pooled_prompt_embeds": pooled.to(self.device, non_blocking=True),
            }
        )

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """v = ε − x0 at (x_t (B, C, H, W), t ∈ [0, 1]) with the distilled guidance; fp32, on x_t's device.

        The transformer gets the packed latent, ``timestep = t`` (it multiplies by 1000 itself, after casting
        to its activation dtype, as under ``FluxPipeline``) and ``guidance = cfg.guidance``.
        """
        if t.ndim != 1 or t.shape[0] != x_t.shape[0]:
            raise ValueError(f"t must have shape (B,) = ({x_t.shape[0]},), got {tuple(t.shape)}")
        if tuple(x_t.shape[1:]) != self.sample_shape:
            raise ValueError(f"x_t must have shape (B, *{self.sample_shape}), got {tuple(x_t.shape)}")
        _, height, width = self.sample_shape
        embeds = cond.tensors["prompt_embeds"].to(self.device, self.dtype)
        guidance = None
        if self.cfg.guidance is not None:
            guidance = torch.full((x_t.shape[0],), self.cfg.guidance, device=self.device, dtype=torch.float32)
        hidden_states = pack_latents(x_t.to(self.device, self.dtype))  # (B, H/2·W/2, 4C)

        def forward() -> Tensor:
            return self.transformer(
                hidden_states=hidden_states,
                timestep=t.to(self.device, torch.float32),
                guidance=guidance,
                pooled_projections=cond.tensors["pooled_prompt_embeds"].to(self.device, self.dtype),
                encoder_hidden_states=embeds,
                txt_ids=torch.zeros(embeds.shape[1], 3, device=self.device),
                img_ids=self._img_ids,
                return_dict=False,
            )[0]

        out = self.throughput.run(forward, (tuple(hidden_states.shape), self._lora.active))
        return unpack_latents(out, height, width).float().to(x_t.device)

    def decode(self, x0: Tensor) -> Tensor:
        """Unpacked latents (B, C, h, w) → images (B, 3, H, W) in [0, 1], fp32 on x0's device."""
        return decode_latents(self.vae, x0, self.device, self.vae_dtype, self.cfg.decode_batch_size)

    def schedule(self, num_steps: int) -> Tensor:
        """(num_steps + 1,) times t from 1 to 0: ``FluxPipeline``'s σ's at this resolution; see ``docs/flux.md``."""
        return flux_sigmas(self.scheduler_config, num_steps, self.image_seq_len)

    @property
    def schedule_shift(self) -> float:
        """The fixed shift s with ``flow_schedule(N, s)`` = :meth:`schedule` (N): e^μ for FLUX.1-dev (1.878 at 512 px).

        ``flow_schedule`` shifts ``linspace(1, 0, N + 1)`` by ``s·t / (1 + (s − 1)·t)``; the pipeline's exponential
        ``time_shift`` of the same grid is ``e^μ / (e^μ + 1/t − 1)``, the same map with s = e^μ.
        """
        config = self.scheduler_config
        unsupported = [k for k in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                                   "use_beta_sigmas", "invert_sigmas") if config.get(k)]  # fmt: skip
        if unsupported:
            raise ValueError(f"scheduler config sets {unsupported}: no fixed shift reproduces its schedule")
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        mu = dynamic_shift_mu(self.image_seq_len, config)
        if config.get("time_shift_type", "exponential") == "exponential":
            return math.exp(mu)
        return mu  # linear time_shift: mu / (mu + 1/t − 1)

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
        """Write ``pytorch_lora_weights.safetensors`` that ``FluxPipeline.load_lora_weights`` reads (α/r in metadata).

        Save EMA weights with ``tensors=optim.ema.shadow`` or ``tensors=checkpoint_ema_shadow(path)``
        (``harness.policies.lora``) from a run's checkpoint.
        """
        from diffusers import FluxPipeline

        return self._lora.save(directory, FluxPipeline, which, tensors)

    def load_lora(self, directory: str | Path, which: Literal["train", "old"] = "train") -> None:
        """Load a LoRA written by :meth:`save_lora` (a diffusers FLUX LoRA file with rank/alpha metadata)."""
        from diffusers import FluxPipeline

        self._lora.load(directory, FluxPipeline, which)

    # ------------------------------------------------------------------------------ checkpoints (ResumablePolicy)
    def weight_state(self, which: WeightSet) -> dict[str, Tensor]:
        """A CPU copy of θ's or old's LoRA tensors (the base model never changes)."""
        if which == "ref":
            raise ValueError("weight set 'ref' is the frozen base model: it has no state to save")
        return self._lora.state_dict(which)

    def load_weight_state(self, which: WeightSet, state: dict[str, Tensor]) -> None:
        """Copy LoRA tensors (keys as :meth:`lora_state_dict`) into θ ("train") or old."""
        self._lora.load_state_dict(which, state)
