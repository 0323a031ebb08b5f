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
from harness.samplers import SAMPLERS
from harness.statistics import DEFAULT_GAIN
from harness.suite_model import GuidedVariant, ModelSpec, check_flux_methods, check_model
from harness.validation import require

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BenchmarkSpec:
    name: str = "shapes"  # a registered benchmark (diffrl list benchmarks)
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of its factory
    # Keyword arguments of the registered reward that `options.reward` names and that scores the eval
    # images (e.g. GenEval's accuracy: {judgement: correct}); empty: the registry builds its defaults.
    reward_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RewardTerm:
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the reward's factory
    # Before weighting: none (raw, as the official multi_score), fixed_range ((x − low)/(high − low),
    # clamped to [0, 1]; needs `range`) or running (standardised by running mean and std).
    normalize: Literal["none", "fixed_range", "running"] = "none"
    range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        require(math.isfinite(self.weight) and self.weight >= 0, "weight", self.weight, "a finite number >= 0")
        if (self.normalize == "fixed_range") != (self.range is not None):
            raise ValueError(
                f"normalize 'fixed_range' takes range: [low, high], and only it does (got normalize "
                f"{self.normalize!r}, range {None if self.range is None else list(self.range)})"
            )
        if self.range is not None:
            low, high = self.range
            require(math.isfinite(low) and math.isfinite(high) and low < high, "range", list(self.range),
                    "[low, high] with finite low < high")  # fmt: skip


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

    def __post_init__(self) -> None:
        require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.label) is not None, "label", self.label,
                "letters, digits, '_', '-' or '.' (a folder name)")  # fmt: skip
        scale = self.eval_cfg
        require(math.isfinite(scale) and scale >= 1, "eval_cfg", scale, "a finite number >= 1 (1: no guidance)")


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    prompts_per_iteration: int = 16
    images_per_prompt: int = 8
    max_iterations: int = 100_000  # a safety cap; the budget ends runs
    checkpoint_every: int = 5  # iterations between checkpoints (evaluations always checkpoint)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        for name in ("prompts_per_iteration", "max_iterations", "checkpoint_every"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        require(self.images_per_prompt >= 2, "images_per_prompt", self.images_per_prompt,
                "an integer >= 2 (groups need two images)")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class EvalSpec:
    sampler: str = "euler"
    num_steps: int = 10
    shift: float = 1.0
    batch_size: int = 128
    grids: int = 2  # eval images per task in each saved sample grid (0: none)

    def __post_init__(self) -> None:
        require(self.sampler in SAMPLERS, "sampler", self.sampler, f"one of {', '.join(SAMPLERS)}")
        for name in ("num_steps", "batch_size"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        require(math.isfinite(self.shift) and self.shift > 0, "shift", self.shift, "a finite number > 0")
        require(self.grids >= 0, "grids", self.grids, "an integer >= 0")

    def settings(self, guidance_scale: float) -> EvalSettings:
        """How eval images are made under this spec at ``guidance_scale`` (a variant's ``eval_cfg``)."""
        return EvalSettings(num_steps=self.num_steps, guidance_scale=guidance_scale, shift=self.shift,
                            batch_size=self.batch_size)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ReportSpec:
    metric: str = "overall"  # the headline metric (a key of the benchmark's metrics)
    unit: Unit | None = None  # x axis of the curves (default: the budget's unit)
    log_x: bool = False
    reference: str | None = None  # speedups are relative to this label
    target: float | None = None  # an absolute score to reach (null: target_gain)
    # The target when `target` is null: this fraction of the reference's final seed-mean gain over the
    # untrained model (docs/statistics.md); 1.0 is the reference's final seed-mean score.
    target_gain: float = DEFAULT_GAIN

    def __post_init__(self) -> None:
        require(self.target is None or math.isfinite(self.target), "target", self.target, "a finite number or null")
        require(math.isfinite(self.target_gain) and 0 < self.target_gain <= 1, "target_gain", self.target_gain,
                "a fraction in (0, 1] of the reference's gain")  # fmt: skip


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

    def __post_init__(self) -> None:
        require(re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", self.name) is not None, "name", self.name,
                "lower-case letters, digits, '_', '-' or '.' (a folder name)")  # fmt: skip
        seeds = self.seeds
        require(bool(seeds) and len(set(seeds)) == len(seeds) and min(seeds) >= 0, "seeds", list(seeds),
                "distinct non-negative integers")  # fmt: skip


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
        """How variant ``label`` is evaluated: the suite's eval spec at the variant's ``eval_cfg``."""
        entry = next(m for m in self.config.methods if m.label == label)
        return self.config.eval.settings(entry.eval_cfg)


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
    benchmark = make_benchmark(cfg.benchmark)
    model, model_config = check_model(cfg.model)
    cfg = dataclasses.replace(cfg, model=model)
    rewards = _build_rewards(cfg.rewards)
    method_configs = _build_method_configs(cfg.methods, rewards)
    if cfg.model.kind == "flux":
        check_flux_methods(cfg.model, model_config, _guided_variants(cfg, method_configs), cfg.eval.shift)
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


def _build_rewards(terms: Mapping[str, RewardTerm], where: str = "suite.rewards") -> dict[str, Any]:
    """Each reward built (weights load lazily, so this is cheap), after checking its name and normalisation."""
    from rewards import REWARDS

    if not terms:
        raise ConfigError(f"{where} is empty: name at least one registered reward (diffrl list rewards)")
    rewards = {}
    for key, term in terms.items():
        _check_registered(REWARDS, key, f"{where}.{key}")
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
        _check_registered(METHODS, entry.method, f"{where}.method")
        method_cls = METHODS.get(entry.method)
        method_cfg: Any = build(method_cls.Config, entry.config, where=f"{where}.config")
        own = _build_rewards(entry.rewards, f"{where}.rewards") if entry.rewards is not None else None
        _check_method_compatibility(method_cls, method_cfg, rewards if own is None else own, where)
        method_configs[entry.label] = method_cfg
    return method_configs


def _guided_variants(cfg: SuiteConfig, method_configs: Mapping[str, Any]) -> list[GuidedVariant]:
    """Each variant's guidance settings, as the FLUX checks read them (method classes declare their CFG fields)."""
    from methods import METHODS

    return [
        GuidedVariant(where=f"suite.methods[{i}]", label=entry.label, config=method_configs[entry.label],
                      guidance_fields=METHODS.get(entry.method).capabilities.guidance_fields, eval_cfg=entry.eval_cfg)
        for i, entry in enumerate(cfg.methods)
    ]  # fmt: skip


def _check_registered(registry: Any, key: str, where: str) -> None:
    try:
        registry.check(key)
    except KeyError as error:
        raise ConfigError(f"{where}: {error.args[0]}") from None


def _check_method_compatibility(method_cls: Any, method_cfg: Any, rewards: Mapping[str, Any], where: str) -> None:
    """What the method's declared capabilities need: a registered (stochastic) sampler, differentiable rewards."""
    capabilities = method_cls.capabilities
    if capabilities.sampler_field is not None:
        key = f"{where}.config.{capabilities.sampler_field}"
        sampler_name = getattr(method_cfg, capabilities.sampler_field)
        if sampler_name not in SAMPLERS:
            raise ConfigError(f"{key} = {sampler_name!r}; allowed: {', '.join(SAMPLERS)}")
        if capabilities.needs_log_prob and not SAMPLERS[sampler_name].stochastic:
            stochastic = [name for name, cls in SAMPLERS.items() if cls.stochastic]
            raise ConfigError(
                f"{key} = {sampler_name!r} is deterministic, but {method_cls.__name__} needs "
                f"transition log-probs; allowed: {', '.join(stochastic)}"
            )
    if capabilities.needs_differentiable_reward:
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
