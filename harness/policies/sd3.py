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
  ``dtype``; the LoRA parameters are fp32 master weights and the forward runs under autocast.
  ``dtype="fp16"`` is refused: the shared optimizer has no loss scaling (the official SD3 runs use
  fp16 autocast with a ``GradScaler``); bf16 needs none. Deviation: bf16, not the official fp16.
* **EMA weights** of a finished run live in its checkpoint (``optim → ema → shadow``);
  :func:`checkpoint_ema_shadow` reads them for :meth:`SD3Policy.save_lora`.
* **Decoding.** ``latents / scaling_factor + shift_factor`` through the VAE, then ``[−1, 1] → [0, 1]``
  (``StableDiffusion3Pipeline.__call__`` and ``VaeImageProcessor.postprocess``).
* **Schedule.** :meth:`SD3Policy.schedule` returns the pipeline scheduler's own σ grid (shift 3 for
  SD3.5), which differs from :func:`harness.samplers.flow_schedule` in the last steps; see ``docs/sd3.md``.

Inputs of :meth:`~SD3Policy.velocity` and :meth:`~SD3Policy.decode` may live on any device: they are moved
to the model's device and the result comes back on the input's device, in fp32, so methods that keep
latents and sampler math on the CPU work unchanged.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from harness.policy import WEIGHT_SETS, Cond, WeightSet

log = logging.getLogger(__name__)

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTypeName = Literal["fp32", "fp16", "bf16"]
# The joint-attention projections of the MMDiT blocks (official DiffusionNFT/FlowGRPO targets). The ``attn.``
# prefix matters: peft matches suffixes, and plain ``to_q`` would also adapt SD3.5's extra ``attn2`` layers.
JOINT_ATTENTION_TARGETS: tuple[str, ...] = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)  # fmt: skip
TRAIN_ADAPTER, OLD_ADAPTER = "default", "old"

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
        from peft import LoraConfig

        # peft annotates lora_alpha as int but only ever divides by it: pass an integral α as int and keep a
        # fractional one as the float it is (the cast only quiets the annotation).
        alpha = int(self.alpha) if float(self.alpha).is_integer() else cast(int, self.alpha)
        return LoraConfig(
            r=self.rank,
            lora_alpha=alpha,
            target_modules=list(self.target_modules),
            init_lora_weights=self.init_lora_weights,
            lora_dropout=0.0,
        )


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


def _dtype(name: str, field: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{field} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _train_dtype(name: str) -> torch.dtype:
    """``SD3PolicyConfig.dtype``: fp16 is refused, since the LoRA gradients would go unscaled."""
    if name == "fp16":
        raise ValueError(
            "SD3PolicyConfig.dtype='fp16' is not supported for training: harness/optim.py has no loss scaling "
            "(GradScaler), so fp16 activation gradients can underflow to zero; use dtype='bf16' (same exponent "
            "range as fp32, no scaling needed) or 'fp32'"
        )
    return _dtype(name, "SD3PolicyConfig.dtype")


def checkpoint_ema_shadow(path: str | Path) -> list[Tensor]:
    """The EMA weights saved in a :func:`harness.trainer.train` checkpoint, in ``trainable_parameters()`` order.

    ``train(..., checkpoint=path)`` writes ``optim.state_dict()`` there, whose ``ema`` entry holds
    ``shadow``: pass the result to :meth:`SD3Policy.save_lora` as ``tensors``.
    """
    payload = torch.load(path, map_location="cpu", weights_only=False)  # the trainer's own file (numpy RNG state)
    try:
        shadow = payload["optim"]["ema"]["shadow"]
    except (KeyError, TypeError):
        raise ValueError(f"{path} is not a harness.trainer checkpoint: it has no optim → ema → shadow entry") from None
    return [tensor.float() for tensor in shadow]


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Frozen ``module`` on ``device`` in ``dtype`` (cast only when needed: diffusers warns on every cast)."""
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    return module.to(device).requires_grad_(False)


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
        self.dtype = _train_dtype(cfg.dtype)
        if cfg.max_cached_prompts is not None and cfg.max_cached_prompts < 1:
            raise ValueError(f"SD3PolicyConfig.max_cached_prompts must be >= 1 or None, got {cfg.max_cached_prompts}")
        self.vae_dtype = _dtype(cfg.vae_dtype, "SD3PolicyConfig.vae_dtype")
        self.transformer = _place(transformer, self.device, self.dtype)
        self.vae = _place(vae, self.device, self.vae_dtype)
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
        self._add_lora(cfg.lora)
        if cfg.gradient_checkpointing:
            cast(Any, self.transformer).enable_gradient_checkpointing()  # diffusers ModelMixin method
        self._active: WeightSet = "train"
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()  # CPU tensors, oldest use first
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
        dtype = _train_dtype(cfg.dtype)
        # Each component is loaded straight into its own dtype: the VAE must not pass through bf16 on its way to fp32.
        dtypes = {"default": dtype, "vae": _dtype(cfg.vae_dtype, "SD3PolicyConfig.vae_dtype")}
        pipeline = StableDiffusion3Pipeline.from_pretrained(str(path_or_id), dtype=dtypes, revision=revision)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            encoder = getattr(pipeline, name)
            if encoder is None:
                raise ValueError(f"{path_or_id}: pipeline component {name!r} is missing; SD3Policy needs all three")
            encoder.to(device).requires_grad_(False)
        encoder = PipelinePromptEncoder(pipeline, cfg.max_sequence_length, device)
        return cls(pipeline.transformer, pipeline.vae, dict(pipeline.scheduler.config), encoder, cfg, device=device)

    # ----------------------------------------------------------------------------------------- LoRA adapters
    def _add_lora(self, lora: SD3LoRAConfig) -> None:
        """θ ("default") and old adapters, both fp32; old starts as a copy of θ."""
        names = [n for n, _ in self.transformer.named_modules()]
        unmatched = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            raise ValueError(
                f"SD3LoRAConfig.target_modules {unmatched} match no module of {type(self.transformer).__name__} "
                f"(peft matches name suffixes, e.g. 'attn.to_q'); default: {JOINT_ATTENTION_TARGETS}"
            )
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the design
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            transformer: Any = self.transformer  # diffusers' PeftAdapterMixin methods, unseen by nn.Module's typing
            for name in (TRAIN_ADAPTER, OLD_ADAPTER):
                transformer.add_adapter(lora.peft_config(), adapter_name=name)
        params = dict(self.transformer.named_parameters())
        self._train_names = sorted(n for n in params if f".{TRAIN_ADAPTER}." in n and "lora_" in n)
        self._old_names = [n.replace(f".{TRAIN_ADAPTER}.", f".{OLD_ADAPTER}.") for n in self._train_names]
        for name in (*self._train_names, *self._old_names):
            params[name].data = params[name].data.float()  # fp32 master weights (peft casts to the base dtype)
        self._train_params = [params[n] for n in self._train_names]
        self._old_params = [params[n] for n in self._old_names]
        self._select("train")
        self.update_old(0.0)

    def _select(self, which: WeightSet) -> None:
        transformer: Any = self.transformer  # diffusers' PeftAdapterMixin methods, unseen by nn.Module's typing
        if which == "ref":
            transformer.disable_adapters()
        else:
            transformer.enable_adapters()
            transformer.set_adapter(TRAIN_ADAPTER if which == "train" else OLD_ADAPTER)
        # peft toggles requires_grad on every switch; θ must stay trainable (autograd drops the gradient of a
        # leaf whose requires_grad is False at backward time) and old must never be.
        for p in self._train_params:
            p.requires_grad_(True)
        for p in self._old_params:
            p.requires_grad_(False)

    @contextmanager
    def use_weights(self, which: WeightSet) -> Iterator[None]:
        """θ ("train": adapter ``default``), the sampling policy ("old": adapter ``old``) or the base ("ref")."""
        if which not in WEIGHT_SETS:
            raise ValueError(f"weight set must be one of {WEIGHT_SETS}, got {which!r}")
        previous = self._active
        self._select(which)
        self._active = which
        try:
            yield
        finally:
            self._select(previous)
            self._active = previous

    def trainable_parameters(self) -> list[nn.Parameter]:
        """θ's LoRA parameters (fp32), in a fixed order (sorted names) that :meth:`save_lora` relies on."""
        return list(self._train_params)

    @torch.no_grad()
    def update_old(self, eta: float) -> None:
        """``old ← η·old + (1 − η)·θ`` on the LoRA parameters; ``eta = 0`` copies θ."""
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        for old, new in zip(self._old_params, self._train_params, strict=True):
            old.mul_(eta).add_(new.detach(), alpha=1.0 - eta)

    # ---------------------------------------------------------------------------------------- the model
    def encode(self, prompts: Sequence[str]) -> Cond:
        """Prompt embeddings (B, 77 + max_sequence_length, D) and pooled (B, P) on the model's device.

        Embeddings are cached on the CPU, least recently used first out beyond ``cfg.max_cached_prompts``
        (``""`` is never dropped); only the batch is moved to the device.
        """
        rows: dict[str, tuple[Tensor, Tensor]] = {}
        missing = []
        for prompt in dict.fromkeys(prompts):
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                rows[prompt] = self._cache[prompt]
            else:
                missing.append(prompt)
        if missing:
            embeds, pooled = (tensor.detach().cpu() for tensor in self.prompt_encoder(missing))
            for i, prompt in enumerate(missing):  # clone: a row view would keep the whole batch alive
                rows[prompt] = self._cache[prompt] = (embeds[i].clone(), pooled[i].clone())
            self._evict()
        return Cond(
            {
                "prompt_embeds": torch.stack([rows[p][0] for p in prompts]).to(self.device, non_blocking=True),
                "pooled_prompt_embeds": torch.stack([rows[p][1] for p in prompts]).to(self.device, non_blocking=True),
            }
        )

    def _evict(self) -> None:
        limit = self.cfg.max_cached_prompts
        if limit is None:
            return
        evictable = [prompt for prompt in self._cache if prompt != ""]  # oldest use first
        for prompt in evictable[: max(0, len(evictable) - limit)]:
            del self._cache[prompt]

    def _autocast(self) -> Any:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """v = ε − x0 at (x_t, t ∈ [0, 1]); the transformer sees ``timestep = 1000·t``. fp32, on x_t's device."""
        if t.ndim != 1 or t.shape[0] != x_t.shape[0]:
            raise ValueError(f"t must have shape (B,) = ({x_t.shape[0]},), got {tuple(t.shape)}")
        timestep = t.to(self.device, torch.float32) * self.num_train_timesteps
        with self._autocast():
            out = self.transformer(
                hidden_states=x_t.to(self.device, self.dtype),
                timestep=timestep,
                encoder_hidden_states=cond.tensors["prompt_embeds"].to(self.device, self.dtype),
                pooled_projections=cond.tensors["pooled_prompt_embeds"].to(self.device, self.dtype),
                return_dict=False,
            )[0]
        return out.float().to(x_t.device)

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        """Latents (B, C, h, w) → images (B, 3, H, W) in [0, 1], fp32 on x0's device."""
        vae: Any = self.vae  # diffusers AutoencoderKL: config attributes and decode() unseen by nn.Module's typing
        scaling = vae.config.scaling_factor
        shift = vae.config.shift_factor or 0.0
        images = []
        for start in range(0, x0.shape[0], self.cfg.decode_batch_size):
            z = x0[start : start + self.cfg.decode_batch_size].to(self.device, self.vae_dtype) / scaling + shift
            image = vae.decode(z, return_dict=False)[0]
            images.append(((image.float() + 1) / 2).clamp(0, 1).to(x0.device))
        return torch.cat(images)

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
        if which not in ("train", "old"):
            raise ValueError(f"which must be 'train' or 'old' (ref has no LoRA), got {which!r}")
        names: list[str]
        values: Sequence[Tensor]
        names, values = (
            (self._train_names, self._train_params) if which == "train" else (self._old_names, self._old_params)
        )
        if tensors is not None:
            if which != "train" or len(tensors) != len(values):
                raise ValueError(
                    f"tensors must align with trainable_parameters() ({len(values)} tensors, which='train'), "
                    f"got {len(tensors)} with which={which!r}"
                )
            for given, param in zip(tensors, values, strict=True):
                if given.shape != param.shape:
                    raise ValueError(f"tensor shape {tuple(given.shape)} != parameter shape {tuple(param.shape)}")
            values = list(tensors)
        adapter = TRAIN_ADAPTER if which == "train" else OLD_ADAPTER
        return {
            n.replace(f".{adapter}.", "."): v.detach().to("cpu", torch.float32, copy=True)
            for n, v in zip(names, values, strict=True)
        }

    def save_lora(
        self, directory: str | Path, which: Literal["train", "old"] = "train", tensors: Sequence[Tensor] | None = None
    ) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` that ``StableDiffusion3Pipeline.load_lora_weights`` reads.

        The peft LoRA config (rank, alpha, targets) travels in the file's metadata, so the loader scales the
        update by α/r = 2 rather than guessing α = r. Save EMA weights with ``tensors=optim.ema.shadow``, or
        ``tensors=checkpoint_ema_shadow(path)`` from a run's checkpoint.
        """
        from diffusers import StableDiffusion3Pipeline

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        metadata = self.cfg.lora.peft_config().to_dict()
        StableDiffusion3Pipeline.save_lora_weights(
            directory, transformer_lora_layers=self.lora_state_dict(which, tensors),
            transformer_lora_adapter_metadata=metadata,
        )  # fmt: skip
        return directory

    @torch.no_grad()
    def load_lora(self, directory: str | Path, which: Literal["train", "old"] = "train") -> None:
        """Load a LoRA written by :meth:`save_lora` (a diffusers SD3 LoRA file with rank/alpha metadata)."""
        from diffusers import StableDiffusion3Pipeline

        state, metadata = StableDiffusion3Pipeline.lora_state_dict(str(directory), return_lora_metadata=True)
        prefix = "transformer."
        lora = self.cfg.lora
        saved = {k: (metadata or {}).get(prefix + k) for k in ("r", "lora_alpha")}
        if saved["r"] is None or saved["lora_alpha"] is None:
            raise ValueError(
                f"{directory}: the LoRA file has no rank/alpha metadata; write it with SD3Policy.save_lora"
            )
        if (int(saved["r"]), float(saved["lora_alpha"])) != (lora.rank, float(lora.alpha)):
            raise ValueError(
                f"{directory}: LoRA has r={saved['r']}, alpha={saved['lora_alpha']} but SD3LoRAConfig has "
                f"rank={lora.rank}, alpha={lora.alpha}; build the policy with the file's values"
            )
        self.load_weight_state(which, {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})

    # ------------------------------------------------------------------------------ checkpoints (ResumablePolicy)
    def weight_state(self, which: WeightSet) -> dict[str, Tensor]:
        """A CPU copy of θ's or old's LoRA tensors (the base model never changes)."""
        if which == "ref":
            raise ValueError("weight set 'ref' is the frozen base model: it has no state to save")
        return self.lora_state_dict(which)

    @torch.no_grad()
    def load_weight_state(self, which: WeightSet, state: dict[str, Tensor]) -> None:
        """Copy LoRA tensors (keys as :meth:`lora_state_dict`) into θ ("train") or old."""
        if which == "ref":
            raise ValueError("which must be 'train' or 'old' (ref has no LoRA), got 'ref'")
        expected = self.lora_state_dict(which)
        if set(state) != set(expected):
            missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(
                f"LoRA keys do not match this policy's SD3LoRAConfig (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); build the policy with the LoRA's target_modules"
            )
        params = self._train_params if which == "train" else self._old_params
        for key, param in zip(expected, params, strict=True):
            if state[key].shape != param.shape:
                raise ValueError(
                    f"{key} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)} "
                    f"(SD3LoRAConfig.rank={self.cfg.lora.rank})"
                )
            param.copy_(state[key].to(param.device, param.dtype))
