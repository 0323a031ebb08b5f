"""Suite files: a head-to-head comparison declared in YAML and validated before any compute.

A suite names the benchmark, the model, the training reward(s) with weights, the methods as
named variants with their configs, the seeds, one compute budget with its eval fractions, and
how the report reads the results. :func:`load_suite` checks every key and value (unknown keys
with a did-you-mean, types, registered names, incompatible choices such as a method that needs
transition log-probs with a deterministic sampler) and raises :class:`~harness.config.ConfigError`
naming the key and what is allowed. Nothing runs until the whole file is valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from harness.budget import Budget, Unit
from harness.config import ConfigError, build, call_checked
from harness.evaluate import EvalSettings
from harness.optim import OptimConfig
from harness.samplers import SAMPLERS, make_sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BenchmarkSpec:
    name: str = "shapes"  # a registered benchmark (diffrl list benchmarks)
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of its factory
    # Keyword arguments of the registered reward that `options.reward` names and that scores the eval
    # images (e.g. GenEval's accuracy: {judgement: correct}); empty: the registry builds its defaults.
    reward_options: dict[str, Any] = field(default_factory=dict)


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
    device: str = "auto"  # sd3/flux: auto (cuda if available, else cpu), cpu, cuda or cuda:N; tiny DiT: the CPU


@dataclass(frozen=True, kw_only=True)
class RewardTerm:
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the reward's factory
    # Before weighting: none (raw, as the official multi_score), fixed_range ((x − low)/(high − low),
    # clamped to [0, 1]; needs `range`) or running (standardised by running mean and std).
    normalize: Literal["none", "fixed_range", "running"] = "none"
    range: tuple[float, float] | None = None


@dataclass(frozen=True, kw_only=True)
class MethodEntry:
    """One named variant: a registered method, its config overrides, and its evaluation protocol."""

    label: str  # the variant's name in tables and plots, e.g. flow_grpo_cfg4.5
    method: str  # a registered method (diffrl list methods)
    config: dict[str, Any] = field(default_factory=dict)  # fields of the method's Config
    eval_cfg: float = 1.0  # guidance at evaluation, as the method's official protocol
    description: str = ""
    # This variant's training reward instead of suite.rewards (e.g. a differentiable proxy for direct
    # reward backprop); None: suite.rewards. The benchmark's eval metric is the same for every variant.
    rewards: dict[str, RewardTerm] | None = None


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    prompts_per_iteration: int = 16
    images_per_prompt: int = 8
    max_iterations: int = 100_000  # a safety cap; the budget ends runs
    checkpoint_every: int = 5  # iterations between checkpoints (evaluations always checkpoint)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(frozen=True, kw_only=True)
class EvalSpec:
    sampler: str = "euler"
    num_steps: int = 10
    shift: float = 1.0
    batch_size: int = 128
    grids: int = 2  # eval images per task in each saved sample grid (0: none)


@dataclass(frozen=True, kw_only=True)
class ReportSpec:
    metric: str = "overall"  # the headline metric (a key of the benchmark's metrics)
    unit: Unit | None = None  # x axis of the curves (default: the budget's unit)
    log_x: bool = False
    reference: str | None = None  # speedups are relative to this label
    target: float | None = None  # compute-to-target threshold (default: the reference's final score)


@dataclass(frozen=True, kw_only=True)
class SuiteConfig:
    name: str
    description: str = ""
    benchmark: BenchmarkSpec = field(default_factory=BenchmarkSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    rewards: dict[str, RewardTerm]  # the training reward: a weighted sum of registered rewards
    methods: tuple[MethodEntry, ...]
    seeds: tuple[int, ...] = (0,)
    budget: Budget
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    trackers: tuple[str, ...] = ()  # accelerate trackers: tensorboard, wandb, ... (never required)


@dataclass(frozen=True)
class Suite:
    """A validated suite: the config plus each variant's built method config (and the model's, for sd3/flux)."""

    config: SuiteConfig
    method_configs: dict[str, Any]  # label → the method's Config instance
    source: str  # where it was loaded from
    model_config: Any = None  # sd3 / flux: the SD3PolicyConfig / FluxPolicyConfig of model.options; tiny_dit: None

    @property
    def name(self) -> str:
        return self.config.name

    def resolved(self) -> dict[str, Any]:
        """The whole configuration with every default filled in (what the report prints and the hash covers)."""
        data = dataclasses.asdict(self.config)
        for entry in data["methods"]:
            entry["config"] = dataclasses.asdict(self.method_configs[entry["label"]])
        if self.model_config is not None:
            data["model"]["options"] = dataclasses.asdict(self.model_config)
        return data

    def config_hash(self) -> str:
        return config_digest(self.resolved())

    def cell_fingerprint(self, label: str, seed: int) -> str:
        """What one (variant, seed) run depends on: adding a variant or a seed leaves other cells valid."""
        data = self.resolved()
        data["methods"] = [m for m in data["methods"] if m["label"] == label]
        for key in ("name", "description", "seeds", "report", "trackers"):
            data.pop(key)
        data["seed"] = seed
        return config_digest(data)

    def eval_settings(self, label: str) -> EvalSettings:
        entry = next(m for m in self.config.methods if m.label == label)
        spec = self.config.eval
        return EvalSettings(
            num_steps=spec.num_steps, guidance_scale=entry.eval_cfg, shift=spec.shift, batch_size=spec.batch_size
        )


def config_digest(data: Any) -> str:
    """SHA-256 of a JSON rendering with sorted keys (dataclasses and paths by their ``str``)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain PyYAML keeps the last one silently)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise ConfigError(
                f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line {seen[key]})"
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def builtin_suites() -> list[str]:
    """Names of the suites shipped in ``harness/suites``."""
    folder = resources.files("harness") / "suites"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def suite_path(name_or_path: str | Path) -> Path:
    """A suite file: a path, or the name of a built-in suite (``shapes_quick``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"suite file {path} does not exist")
        return path
    builtin = Path(str(resources.files("harness") / "suites" / f"{name_or_path}.yaml"))
    if not builtin.is_file():
        raise ConfigError(f"no suite file {name_or_path!r}: give a .yaml path or one of {', '.join(builtin_suites())}")
    return builtin


def load_suite(name_or_path: str | Path) -> Suite:
    """Read and validate a suite file (see the module docstring)."""
    path = suite_path(name_or_path)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must hold a mapping of suite keys, got {type(data).__name__}")
    return validate_suite(data, source=str(path))


def validate_suite(data: Mapping[str, Any], source: str = "<mapping>") -> Suite:
    """Build the :class:`SuiteConfig` strictly, then check names and cross-field compatibility."""
    cfg = build(SuiteConfig, data, where="suite")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", cfg.name):
        raise ConfigError(f"suite.name = {cfg.name!r}; use lower-case letters, digits, '_', '-' or '.' (a folder name)")
    benchmark = make_benchmark(cfg.benchmark)
    model, model_config = _check_model(cfg.model)
    cfg = dataclasses.replace(cfg, model=model)
    rewards = _build_rewards(cfg.rewards)
    method_configs = _build_method_configs(cfg.methods, rewards)
    _check_loop(cfg)
    if cfg.model.kind == "flux":
        _check_flux_methods(cfg, method_configs, model_config)
    if cfg.report.metric not in benchmark.metrics:
        raise ConfigError(f"suite.report.metric = {cfg.report.metric!r}; allowed: {', '.join(benchmark.metrics)}")
    if cfg.report.reference is not None and cfg.report.reference not in method_configs:
        raise ConfigError(f"suite.report.reference = {cfg.report.reference!r}; allowed: {', '.join(method_configs)}")
    _check_trackers(cfg.trackers)
    return Suite(cfg, method_configs, source, model_config)


def make_benchmark(spec: BenchmarkSpec) -> Any:
    """The benchmark ``spec`` names, its eval reward built from ``reward_options`` when given (weights load lazily)."""
    from benchmarks import BENCHMARKS
    from rewards import REWARDS

    _check_registered(BENCHMARKS, spec.name, "suite.benchmark.name")
    options = dict(spec.options)
    if spec.reward_options:
        key = options.get("reward")
        if not isinstance(key, str):
            raise ConfigError(
                f"suite.benchmark.reward_options configure the registered reward that suite.benchmark.options.reward "
                f"names, but that is {key!r}; name one (e.g. reward: geneval) or drop reward_options"
            )
        _check_registered(REWARDS, key, "suite.benchmark.options.reward")
        options["reward"] = call_checked(REWARDS.get(key), spec.reward_options, "suite.benchmark.reward_options")
    return call_checked(BENCHMARKS.get(spec.name), options, "suite.benchmark.options")


def resolve_device(name: str) -> str:
    """``model.device`` as torch reads it: ``auto`` is cuda if available, else cpu."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _check_model(model: ModelSpec) -> tuple[ModelSpec, Any]:
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
    if model.device not in ("auto", "cpu"):
        raise ConfigError(
            f"suite.model.device = {model.device!r}: the tiny DiT runs on the CPU; allowed: 'auto', 'cpu'"
        )
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
    return dataclasses.replace(model, checkpoint=checkpoint, finetune="lora"), cfg


# FLUX.1-dev's scheduler/scheduler_config.json, and its VAE's downsampling (4 blocks: 2³): all that validation
# needs to know about the default checkpoint, so that it reads and downloads nothing.
FLUX_DEV_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}  # fmt: skip
FLUX_DEV_VAE_SCALE = 8
SHIFT_RTOL = 0.01  # a schedule shift within 1% of the pipeline's counts as the pipeline's (1.88 for 1.8776)
CFG_FIELDS = ("guidance_scale", "rollout_cfg", "train_cfg")  # method config fields that set true CFG


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


def _check_flux_methods(cfg: SuiteConfig, method_configs: Mapping[str, Any], model_config: Any) -> None:
    """FLUX.1 is guidance-distilled: no true CFG anywhere; and the schedule shifts against FluxPipeline's.

    Every CFG field (:data:`CFG_FIELDS`) of a method config and every ``eval_cfg`` must be 1. A method's
    ``shift`` or ``eval.shift`` of 1 (the default: unshifted) where the pipeline's shift at this resolution
    is another is refused, as a shift left unset; any other difference beyond :data:`SHIFT_RTOL` is a
    deliberate choice (DanceGRPO samples FLUX with shift 3) and is logged as a warning.
    """
    guidance = f"suite.model.options.guidance ({model_config.guidance})"
    for i, entry in enumerate(cfg.methods):
        method_cfg = method_configs[entry.label]
        for key in CFG_FIELDS:
            value = getattr(method_cfg, key, 1.0)
            if value != 1.0:
                raise ConfigError(
                    f"suite.methods[{i}].config.{key} = {value:g} ({entry.label}): FLUX.1 is guidance-distilled "
                    f"(FluxPolicy.supports_cfg is False), so true CFG is refused; it takes its distilled guidance "
                    f"through {guidance}. Set {key}: 1.0, as FlowGRPO's FLUX configs (cfg 1)"
                )
        if entry.eval_cfg != 1.0:
            raise ConfigError(
                f"suite.methods[{i}].eval_cfg = {entry.eval_cfg:g} ({entry.label}): FLUX.1 is guidance-distilled "
                f"(FluxPolicy.supports_cfg is False), so true CFG is refused; it evaluates at the distilled "
                f"guidance of {guidance}. Set eval_cfg: 1.0, as FlowGRPO's FLUX configs (cfg 1)"
            )
    assert cfg.model.checkpoint is not None  # filled in by _check_flux
    expected = expected_flux_shift(cfg.model.checkpoint, model_config.resolution)
    if expected is None:
        log.info("%s: its schedule shift is unknown before loading; shifts are not checked", cfg.model.checkpoint)
        return
    shifts = {}
    for i, entry in enumerate(cfg.methods):
        if hasattr(method_configs[entry.label], "shift"):
            shifts[f"suite.methods[{i}].config.shift"] = method_configs[entry.label].shift
    shifts["suite.eval.shift"] = cfg.eval.shift
    for key, shift in shifts.items():
        if math.isclose(shift, expected, rel_tol=SHIFT_RTOL):
            continue
        where = f"{key} = {shift:g}, but FluxPipeline samples {cfg.model.checkpoint} at {model_config.resolution} px"
        if shift == 1.0:
            raise ConfigError(
                f"{where} with shift {expected:.4g} (its resolution-dependent e^mu, FluxPolicy.schedule_shift); "
                f"1 is the unshifted default: set shift: {expected:.4g} (docs/flux.md, 'Running a suite on FLUX')"
            )
        log.warning("%s with shift %.4g: it samples FLUX on another schedule than its pipeline", where, expected)


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


def _build_rewards(terms: Mapping[str, RewardTerm], where: str = "suite.rewards") -> dict[str, Any]:
    """Each reward built (weights load lazily, so this is cheap), after checking its name and normalisation."""
    from rewards import REWARDS

    if not terms:
        raise ConfigError(f"{where} is empty: name at least one registered reward (diffrl list rewards)")
    rewards = {}
    for key, term in terms.items():
        _check_registered(REWARDS, key, f"{where}.{key}")
        if (term.normalize == "fixed_range") != (term.range is not None):
            raise ConfigError(
                f"{where}.{key}: normalize 'fixed_range' takes range: [low, high], and only it does "
                f"(got normalize {term.normalize!r}, range {term.range})"
            )
        if term.range is not None and not term.range[0] < term.range[1]:
            raise ConfigError(f"{where}.{key}.range = {list(term.range)}; needs low < high")
        rewards[key] = call_checked(REWARDS.get(key), term.options, f"{where}.{key}.options")
    return rewards


def _build_method_configs(entries: tuple[MethodEntry, ...], rewards: Mapping[str, Any]) -> dict[str, Any]:
    """label → the method's Config, after checking labels, names and compatibility."""
    from methods import METHODS

    if not entries:
        raise ConfigError("suite.methods is empty: list at least one variant (label, method, config)")
    method_configs: dict[str, Any] = {}
    for i, entry in enumerate(entries):
        where = f"suite.methods[{i}]"
        if entry.label in method_configs:
            raise ConfigError(f"{where}.label = {entry.label!r} is used twice; labels name variants and must differ")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", entry.label):
            raise ConfigError(f"{where}.label = {entry.label!r}; use letters, digits, '_', '-' or '.' (a folder name)")
        _check_registered(METHODS, entry.method, f"{where}.method")
        method_cls = METHODS.get(entry.method)
        method_cfg = build(method_cls.Config, entry.config, where=f"{where}.config")
        own = _build_rewards(entry.rewards, f"{where}.rewards") if entry.rewards is not None else None
        _check_method_compatibility(method_cls, method_cfg, rewards if own is None else own, where)
        if entry.eval_cfg < 1.0:
            raise ConfigError(f"{where}.eval_cfg = {entry.eval_cfg}; must be >= 1 (1 = no guidance)")
        method_configs[entry.label] = method_cfg
    return method_configs


def _check_loop(cfg: SuiteConfig) -> None:
    """Seeds, batch geometry and evaluation settings."""
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds) or min(cfg.seeds) < 0:
        raise ConfigError(f"suite.seeds = {list(cfg.seeds)}; give distinct non-negative integers")
    if cfg.eval.sampler not in SAMPLERS:
        raise ConfigError(f"suite.eval.sampler = {cfg.eval.sampler!r}; allowed: {', '.join(SAMPLERS)}")
    for key in ("num_steps", "batch_size"):
        if getattr(cfg.eval, key) < 1:
            raise ConfigError(f"suite.eval.{key} must be >= 1, got {getattr(cfg.eval, key)}")
    for key in ("prompts_per_iteration", "max_iterations", "checkpoint_every"):
        if getattr(cfg.train, key) < 1:
            raise ConfigError(f"suite.train.{key} must be >= 1, got {getattr(cfg.train, key)}")
    if cfg.train.images_per_prompt < 2:
        raise ConfigError(f"suite.train.images_per_prompt = {cfg.train.images_per_prompt}; groups need >= 2 images")


def _check_registered(registry: Any, key: str, where: str) -> None:
    try:
        registry.check(key)
    except KeyError as error:
        raise ConfigError(f"{where}: {error.args[0]}") from None


def _check_method_compatibility(method_cls: Any, method_cfg: Any, rewards: Mapping[str, Any], where: str) -> None:
    """Choices the config types cannot express: solver vs log-probs, differentiable rewards."""
    sampler_name = getattr(method_cfg, "sampler", None)
    if sampler_name is not None:
        if sampler_name not in SAMPLERS:
            raise ConfigError(f"{where}.config.sampler = {sampler_name!r}; allowed: {', '.join(SAMPLERS)}")
        if method_cls.needs_log_prob and not make_sampler(sampler_name).stochastic:
            stochastic = [name for name, cls in SAMPLERS.items() if cls.stochastic]
            raise ConfigError(
                f"{where}.config.sampler = {sampler_name!r} is deterministic, but {method_cls.__name__} needs "
                f"transition log-probs; allowed: {', '.join(stochastic)}"
            )
    if getattr(method_cls, "needs_differentiable_reward", False):
        plain = [key for key, reward in rewards.items() if not reward.spec.differentiable]
        if plain:
            raise ConfigError(
                f"{where}.method = {method_cls.__name__} backpropagates through the reward, but rewards "
                f"{plain} are not differentiable; give this variant a differentiable training reward "
                f"({where}.rewards, e.g. shapes_classifier on the shapes world)"
            )


def _check_trackers(trackers: tuple[str, ...]) -> None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for i, name in enumerate(trackers):
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"suite.trackers[{i}] = {name!r}; allowed: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        if name not in available:
            raise ConfigError(f"suite.trackers[{i}] = {name!r} is not installed here: pip install {name}")
