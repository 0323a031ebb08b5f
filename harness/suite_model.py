"""The ``model`` section of a suite: the tiny DiT, SD3 or FLUX with LoRA, checked without loading weights.

:class:`ModelSpec` is the section; :func:`check_model` fills in each kind's defaults and builds the policy
config from ``model.options`` (``SD3PolicyConfig``, ``FluxPolicyConfig``), naming the key and the fix on bad
input; for FLUX, :func:`check_flux_methods` refuses true CFG (each method's declared
``capabilities.guidance_fields``) and a left-out schedule shift once the methods are built. Only small JSON
configs of a local pipeline folder are read; weights load when a cell starts. :mod:`harness.suite` imports
this module, never the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from harness.config import ConfigError, build

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    kind: Literal["tiny_dit", "sd3", "flux"] = "tiny_dit"
    # tiny_dit: a checkpoint folder (None: the shapes benchmark's committed base); sd3 / flux: a diffusers
    # pipeline folder or hub id (None: stabilityai/stable-diffusion-3.5-medium / black-forest-labs/FLUX.1-dev).
    # Weights load when a cell starts.
    checkpoint: str | None = None
    finetune: Literal["full", "lora"] | None = None  # None: the kind's only mode (tiny_dit full, sd3/flux lora)
    # sd3: fields of SD3PolicyConfig (lora: SD3LoRAConfig); flux: of FluxPolicyConfig (lora: FluxLoRAConfig)
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda or cuda:N (tiny DiT on CUDA: docs/shapes.md)


@dataclass(frozen=True, kw_only=True)
class GuidedVariant:
    """What the FLUX checks read of one suite variant: its method config's guidance fields and its eval CFG."""

    where: str  # e.g. suite.methods[0]
    label: str
    config: Any  # the method's Config instance
    guidance_fields: tuple[str, ...]  # the method's capabilities.guidance_fields (true-CFG scales; 1.0: off)
    eval_cfg: float


def resolve_device(name: str) -> str:
    """``model.device`` as torch reads it: ``auto`` is cuda if available, else cpu."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_model(model: ModelSpec) -> tuple[ModelSpec, Any]:
    """The model with its kind's defaults filled in, and the policy config built from ``options`` (sd3, flux)."""
    if model.kind == "sd3":
        return _check_sd3(model)
    if model.kind == "flux":
        return _check_flux(model)
    if model.finetune == "lora":
        raise ConfigError("suite.model.finetune = 'lora': the tiny DiT is fully fine-tuned; allowed: 'full'")
    if model.options:
        raise ConfigError(
            f"suite.model.options = {model.options!r}: options configure kind 'sd3' (SD3PolicyConfig) and kind "
            "'flux' (FluxPolicyConfig); the tiny DiT takes none, so drop them"
        )
    _check_device(model.device)
    if model.checkpoint is not None and not Path(model.checkpoint).is_dir():
        raise ConfigError(f"suite.model.checkpoint = {model.checkpoint!r} is not a checkpoint folder")
    return dataclasses.replace(model, finetune="full"), None


def _check_sd3(model: ModelSpec) -> tuple[ModelSpec, Any]:
    """SD3: see :func:`_check_lora_pipeline`; what only the weights can tell (resolution vs VAE and patch
    size) is checked when a cell builds the policy."""
    from harness.policies.sd3 import DEFAULT_MODEL, SD3PolicyConfig

    return _check_lora_pipeline(model, SD3PolicyConfig, DEFAULT_MODEL, "StableDiffusion3Pipeline", "SD3")


def _check_lora_pipeline(
    model: ModelSpec, config_cls: type, default_id: str, pipeline: str, name: str
) -> tuple[ModelSpec, Any]:
    """A diffusers policy (sd3, flux): LoRA only, ``config_cls`` from ``options``, a pipeline folder or hub id
    (default ``default_id``), a device that exists here. Nothing is loaded or downloaded."""
    if model.finetune == "full":
        raise ConfigError(
            f"suite.model.finetune = 'full': the {name} policy trains LoRA adapters only (the frozen base is the KL "
            f"reference); use finetune: lora, the default for kind {model.kind}"
        )
    cfg: Any = build(config_cls, model.options, where="suite.model.options")
    for key in ("resolution", "max_sequence_length", "decode_batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"suite.model.options.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.max_cached_prompts is not None and cfg.max_cached_prompts < 1:
        raise ConfigError(f"suite.model.options.max_cached_prompts must be >= 1 or null, got {cfg.max_cached_prompts}")
    if cfg.dtype == "fp16":
        raise ConfigError(
            "suite.model.options.dtype = 'fp16': training needs loss scaling, which the optimizer lacks; "
            "allowed: 'bf16' (the default), 'fp32'"
        )
    if cfg.lora.rank < 1 or not cfg.lora.alpha > 0 or not cfg.lora.target_modules:
        raise ConfigError(
            f"suite.model.options.lora: rank must be >= 1, alpha > 0 and target_modules non-empty, got rank "
            f"{cfg.lora.rank}, alpha {cfg.lora.alpha}, target_modules {list(cfg.lora.target_modules)}"
        )
    checkpoint = model.checkpoint or default_id
    folder = Path(checkpoint)
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise ConfigError(
                f"suite.model.checkpoint = {checkpoint!r} is a folder without model_index.json; give a diffusers "
                f"{pipeline} folder (save_pretrained) or a hub id such as {default_id!r}"
            )
    elif not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", checkpoint):
        raise ConfigError(
            f"suite.model.checkpoint = {checkpoint!r} is neither a folder nor a hub id (owner/name); "
            f"default: {default_id!r}"
        )
    _check_device(model.device)
    _check_attention_device(cfg.attention_backend, model.device)
    return dataclasses.replace(model, checkpoint=checkpoint, finetune="lora"), cfg


# The attention backends that run on the CPU (torch's default SDPA and its math kernel); the others need CUDA.
CPU_ATTENTION_BACKENDS = ("native", "_native_math")


def _check_attention_device(backend: str | None, device: str) -> None:
    """``options.attention_backend`` (already checked against diffusers' names) can run on ``model.device``."""
    if backend is None or backend in CPU_ATTENTION_BACKENDS or resolve_device(device) != "cpu":
        return
    raise ConfigError(
        f"suite.model.options.attention_backend = {backend!r} needs a CUDA device, but suite.model.device = "
        f"{device!r} runs on the CPU; use attention_backend: null (or {', '.join(CPU_ATTENTION_BACKENDS)}) there"
    )


# FLUX.1-dev's scheduler/scheduler_config.json, and its VAE's downsampling (4 blocks: 2³): all that validation
# needs to know about the default checkpoint, so that it reads and downloads nothing.
FLUX_DEV_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}  # fmt: skip
FLUX_DEV_VAE_SCALE = 8
SHIFT_RTOL = 0.01  # a schedule shift within 1% of the pipeline's counts as the pipeline's (1.88 for 1.8776)


@dataclass(frozen=True)
class FluxPipelineFacts:
    """What validation reads from a FLUX pipeline's config files (never its weights)."""

    scheduler_config: dict[str, Any]
    vae_scale_factor: int  # 2^(len(vae.block_out_channels) − 1), as FluxPipeline
    guidance_embeds: bool  # the transformer has FLUX.1-dev's guidance embedding


@dataclass(frozen=True)
class _ScheduleView:
    """The two attributes :attr:`FluxPolicy.schedule_shift` reads, without a transformer behind them."""

    scheduler_config: dict[str, Any]
    image_seq_len: int


def flux_pipeline_facts(checkpoint: str) -> FluxPipelineFacts | None:
    """The facts of a local pipeline folder (its JSON configs) or of FLUX.1-dev; None for other hub ids."""
    from harness.policies.flux import DEFAULT_MODEL

    folder = Path(checkpoint)
    if not folder.is_dir():
        if checkpoint != DEFAULT_MODEL:
            return None
        return FluxPipelineFacts(dict(FLUX_DEV_SCHEDULER), FLUX_DEV_VAE_SCALE, guidance_embeds=True)
    configs = {}
    for part in ("scheduler/scheduler_config.json", "vae/config.json", "transformer/config.json"):
        if not (folder / part).is_file():
            raise ConfigError(
                f"suite.model.checkpoint = {checkpoint!r} has no {part}; give a diffusers FluxPipeline folder "
                "(save_pretrained)"
            )
        configs[part] = json.loads((folder / part).read_text())
    return FluxPipelineFacts(
        scheduler_config=configs["scheduler/scheduler_config.json"],
        vae_scale_factor=2 ** (len(configs["vae/config.json"]["block_out_channels"]) - 1),
        guidance_embeds=bool(configs["transformer/config.json"].get("guidance_embeds", False)),
    )


def expected_flux_shift(checkpoint: str, resolution: int) -> float | None:
    """The shift s with ``flow_schedule(N, s)`` = FluxPipeline's schedule at ``resolution`` (1.878 at 512 px for
    FLUX.1-dev), from the config files alone; None where unknown (another hub id, or no fixed shift fits)."""
    from harness.policies.flux import FluxPolicy

    facts = flux_pipeline_facts(checkpoint)
    if facts is None:
        return None
    side = resolution // facts.vae_scale_factor
    view = _ScheduleView(facts.scheduler_config, (side // 2) ** 2)  # packed 2×2 tokens, as FluxPolicy
    try:  # the policy's own formula (docs/flux.md "Sampling schedule"), run on the config alone
        return float(FluxPolicy.schedule_shift.fget(view))  # type: ignore[attr-defined]  # a property
    except ValueError as error:
        log.warning("%s: %s; the methods' and eval's shifts are not checked", checkpoint, error)
        return None


def _check_flux(model: ModelSpec) -> tuple[ModelSpec, Any]:
    """FLUX.1: see :func:`_check_lora_pipeline`; for FLUX.1-dev and folders also the resolution (2×2 packing of
    the latent) and the guidance embedding against ``options.guidance``, from config files."""
    from harness.policies.flux import DEFAULT_MODEL, FluxPolicyConfig

    model, cfg = _check_lora_pipeline(model, FluxPolicyConfig, DEFAULT_MODEL, "FluxPipeline", "FLUX")
    assert model.checkpoint is not None  # filled in above
    facts = flux_pipeline_facts(model.checkpoint)
    if facts is None:
        return model, cfg
    multiple = 2 * facts.vae_scale_factor
    if cfg.resolution % multiple:
        raise ConfigError(
            f"suite.model.options.resolution = {cfg.resolution}: FLUX packs 2×2 latent patches, so it must be a "
            f"multiple of 2 × vae_scale_factor = {multiple}; e.g. {cfg.resolution // multiple * multiple or multiple}"
        )
    if facts.guidance_embeds and cfg.guidance is None:
        raise ConfigError(
            f"suite.model.options.guidance = null, but {model.checkpoint} has a guidance embedding (as FLUX.1-dev): "
            "set the distilled guidance scale, e.g. guidance: 3.5"
        )
    if not facts.guidance_embeds and cfg.guidance is not None:
        raise ConfigError(
            f"suite.model.options.guidance = {cfg.guidance}, but {model.checkpoint} has no guidance embedding "
            "(as FLUX.1-schnell): set guidance: null"
        )
    return model, cfg


def check_flux_methods(
    model: ModelSpec, model_config: Any, variants: Sequence[GuidedVariant], eval_shift: float
) -> None:
    """FLUX.1 is guidance-distilled: no true CFG anywhere; and the schedule shifts against FluxPipeline's.

    Every guidance field a method declares (``capabilities.guidance_fields``) and every ``eval_cfg`` must
    be 1. A method's ``shift`` or ``eval.shift`` of 1 (the default: unshifted) where the pipeline's shift at
    this resolution is another is refused, as a shift left unset; any other difference beyond
    :data:`SHIFT_RTOL` is a deliberate choice (DanceGRPO samples FLUX with shift 3) and is logged as a warning.
    """
    for variant in variants:
        _refuse_true_cfg(variant, f"suite.model.options.guidance ({model_config.guidance})")
    assert model.checkpoint is not None  # filled in by _check_flux
    expected = expected_flux_shift(model.checkpoint, model_config.resolution)
    if expected is None:
        log.info("%s: its schedule shift is unknown before loading; shifts are not checked", model.checkpoint)
        return
    shifts = {f"{v.where}.config.shift": v.config.shift for v in variants if hasattr(v.config, "shift")}
    shifts["suite.eval.shift"] = eval_shift
    for key, shift in shifts.items():
        if math.isclose(shift, expected, rel_tol=SHIFT_RTOL):
            continue
        where = f"{key} = {shift:g}, but FluxPipeline samples {model.checkpoint} at {model_config.resolution} px"
        if shift == 1.0:
            raise ConfigError(
                f"{where} with shift {expected:.4g} (its resolution-dependent e^mu, FluxPolicy.schedule_shift); "
                f"1 is the unshifted default: set shift: {expected:.4g} (docs/flux.md, 'Running a suite on FLUX')"
            )
        log.warning("%s with shift %.4g: it samples FLUX on another schedule than its pipeline", where, expected)


def _refuse_true_cfg(variant: GuidedVariant, guidance: str) -> None:
    """FLUX takes its distilled guidance through ``guidance``: every true-CFG scale of ``variant`` must be 1."""
    for key in variant.guidance_fields:
        value = getattr(variant.config, key)
        if value != 1.0:
            raise ConfigError(
                f"{variant.where}.config.{key} = {value:g} ({variant.label}): FLUX.1 is guidance-distilled "
                f"(FluxPolicy.supports_cfg is False), so true CFG is refused; it takes its distilled guidance "
                f"through {guidance}. Set {key}: 1.0, as FlowGRPO's FLUX configs (cfg 1)"
            )
    if variant.eval_cfg != 1.0:
        raise ConfigError(
            f"{variant.where}.eval_cfg = {variant.eval_cfg:g} ({variant.label}): FLUX.1 is guidance-distilled "
            f"(FluxPolicy.supports_cfg is False), so true CFG is refused; it evaluates at the distilled "
            f"guidance of {guidance}. Set eval_cfg: 1.0, as FlowGRPO's FLUX configs (cfg 1)"
        )


def _check_device(device: str) -> None:
    import torch

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"suite.model.device = {device!r}; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'")
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"suite.model.device = {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s); "
                "use 'auto' (cuda if available, else cpu) or 'cpu'"
            )
