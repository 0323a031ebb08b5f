"""Deterministic pretraining of the shapes world's base model (``diffrl pretrain shapes``).

Plain conditional flow matching (Lipman et al. 2023; Liu et al. 2023, rectified flow):
``x_t = (1 − t)·x0 + t·ε``, target ``v = ε − x0``, loss ``‖v_θ(x_t, t, c) − v‖²`` with t drawn
logit-normal (SD3, Esser et al. 2024, §3.1) and the prompt dropped to the empty prompt with
probability ``cond_dropout`` so that CFG works. Training data are fresh ground-truth renders of
prompts drawn uniformly over the six tasks, so the model never sees an image twice.

The checkpoint holds an EMA of the weights (decay ``min(ema_decay, (1 + s)/(10 + s))``), which
samples far cleaner than the raw weights, as usual for diffusion models. The learning rate is
constant after warm-up, so the weights at step k of a long run equal a run with ``steps=k``: the
base checkpoint's budget was chosen by evaluating intermediate steps.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import cache, partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.shapes.prompts import sample_prompts
from harness.config import ConfigError
from harness.geneval_rules import TASKS
from harness.policies.tiny_dit import TinyDiT, TinyDiTConfig, Tokenizer, save_tiny_dit
from harness.policies.tiny_unet import TinyUNet, TinyUNetConfig
from harness.shapes_world.render import add_distractors, draw, layout
from harness.shapes_world.world import VOCABULARY, all_prompts
from harness.validation import (
    check_at_least,
    check_finite,
    check_literals,
    check_non_negative,
    check_positive,
    check_unit_interval,
)

log = logging.getLogger(__name__)

RESUME_FILE = "resume.pt"  # the run's full state, next to its checkpoints

# The committed base's network (issue 15): a conv U-Net; results/shapes_base/diagnosis.md says why not the DiT.
BASE_ARCHITECTURE = TinyUNetConfig(vocabulary=VOCABULARY)
# The base committed before issue 15: a patch-4 v-prediction DiT (PretrainConfig(steps=1500, caption_noise=0, threads=2)).
DIT_ARCHITECTURE = TinyDiTConfig(vocabulary=VOCABULARY)


CaptionNoiseScope = Literal["any", "same_objects"]


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """Pretraining budget and optimiser; the defaults produce the committed base checkpoint."""

    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    lr_cooldown_steps: int = 0  # the last steps decay the lr linearly towards 0 (warmup-stable-decay); 0: constant
    weight_decay: float = 0.0
    cond_dropout: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    distractor_rate: float = 0.0  # mean number of unmentioned objects per training image (Poisson)
    caption_noise: float = 0.5  # probability that an image's caption describes another random scene (alt-text noise)
    caption_noise_scope: CaptionNoiseScope = "any"  # which scene a noisy caption describes (see training_captions)
    caption_noise_start: int = 0  # steps on true captions before the noise begins (training_captions)
    t_logit_mean: float = 0.0  # training times t = sigmoid(N(mean, std²)) (SD3's logit-normal)
    t_logit_std: float = 1.0
    seed: int = 0
    threads: int = 1  # fixed so that the CPU result does not depend on the machine's core count
    save_every: int = 0  # also write step-k checkpoints into <out>/step_<k> (0: only the final one)

    def __post_init__(self) -> None:
        check_at_least(self, 1, "steps", "batch_size", "warmup_steps", "threads")
        check_non_negative(
            self, "weight_decay", "distractor_rate", "save_every", "caption_noise_start", "lr_cooldown_steps"
        )
        check_unit_interval(self, "cond_dropout", "ema_decay", "caption_noise")
        check_positive(self, "lr", "grad_clip", "t_logit_std")
        check_finite(self, "t_logit_mean")
        check_literals(self)


def render_batch(prompts: list[dict], rng: np.random.Generator, distractor_rate: float = 0.0) -> torch.Tensor:
    """Renders in [−1, 1], (B, 3, H, W): each prompt's scene plus Poisson(``distractor_rate``) unmentioned objects."""
    images = np.stack([_render(md, rng, distractor_rate) for md in prompts])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _render(metadata: dict, rng: np.random.Generator, distractor_rate: float) -> np.ndarray:
    objects = layout(metadata, rng)
    if distractor_rate > 0:
        objects = add_distractors(objects, int(rng.poisson(distractor_rate)), rng)
    return draw(objects)


def training_captions(prompts: list[dict], rng: np.random.Generator, cfg: PretrainConfig, step: int = 1) -> list[str]:
    """Each image's caption: with probability ``caption_noise`` another prompt (web alt-text is often wrong
    about its image), then dropped to the empty prompt with probability ``cond_dropout``.

    Noisy captions make p(x | c) a mixture of the prompt's scenes and others, as for a model trained on
    web data: sampling without guidance follows the prompt only part of the time, while CFG (which
    sharpens towards p(c | x)) brings out what the model knows. ``caption_noise_scope``: ``"any"``, a
    random prompt of any scene; ``"same_objects"``, a random prompt naming the same shape classes, so
    that only counts, colours and positions are wrong (attribute noise). Steps up to
    ``caption_noise_start`` (``step`` counts from 1) keep the true captions: the model learns the
    compositions first, then how often alt-text lies. No draw is made while there is no noise, so older
    recipes keep their random stream and a staged run matches the clean one up to its switch.
    """
    captions = [md["prompt"] for md in prompts]
    if cfg.caption_noise > 0 and step > cfg.caption_noise_start:
        replaced = rng.random(len(prompts)) < cfg.caption_noise
        if cfg.caption_noise_scope == "any":
            others = [other["prompt"] for other in sample_prompts(rng, len(prompts))]
        else:
            index = _prompts_by_classes()
            pools = [index[_classes(md)] for md in prompts]
            others = [pool[int(rng.integers(len(pool)))] for pool in pools]
        captions = [other if swap else own for own, other, swap in zip(captions, others, replaced, strict=True)]
    keep = rng.random(len(prompts)) >= cfg.cond_dropout
    return [caption if kept else "" for caption, kept in zip(captions, keep, strict=True)]


def _classes(metadata: dict) -> frozenset[str]:
    return frozenset(clause["class"] for clause in metadata["include"])


@cache
def _prompts_by_classes() -> dict[frozenset[str], tuple[str, ...]]:
    """Every prompt of every task, grouped by the set of shape classes its scene has, in a fixed order."""
    grouped: dict[frozenset[str], list[str]] = defaultdict(list)
    for tag in TASKS:
        for metadata in all_prompts(tag):
            grouped[_classes(metadata)].append(metadata["prompt"])
    return {classes: tuple(texts) for classes, texts in grouped.items()}


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    """The lr's multiplier before optimiser step ``step + 1``: linear warm-up, constant, then the cooldown."""
    factor = min(1.0, (step + 1) / cfg.warmup_steps)
    if cfg.lr_cooldown_steps:
        factor *= min(1.0, (cfg.steps - step) / cfg.lr_cooldown_steps)
    return factor


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class _Run:
    """Everything a pretraining run's next step depends on (what ``resume.pt`` holds)."""

    model: TinyDiT | TinyUNet
    ema: TinyDiT | TinyUNet
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    rng: np.random.Generator  # prompts, layouts, captions
    generator: torch.Generator  # noise and times
    step: int = 0  # steps done


def pretrain(
    cfg: PretrainConfig,
    out_dir: Path,
    model_cfg: TinyDiTConfig | TinyUNetConfig | None = None,
    *,
    resume: bool = False,
) -> Path:
    """Train from scratch (or, with ``resume``, from ``out_dir/resume.pt``) and write the checkpoint folder.

    ``resume.pt`` is written with every ``save_every`` checkpoint and at the end, so a run can be
    stopped and continued, or extended to more steps, bit for bit as if it had run in one go.
    """
    torch.set_num_threads(cfg.threads)
    model_cfg = model_cfg or BASE_ARCHITECTURE
    run = _new_run(cfg, model_cfg)
    if resume and (out_dir / RESUME_FILE).is_file():
        _load_run(run, out_dir / RESUME_FILE, cfg, model_cfg)
        log.info("resuming %s from step %d", out_dir, run.step)
    elif resume:
        log.info("no %s in %s: starting from scratch", RESUME_FILE, out_dir)
    tokenizer = Tokenizer(model_cfg.vocabulary, model_cfg.max_tokens)
    started = time.perf_counter()
    progress = tqdm(range(run.step + 1, cfg.steps + 1), desc="pretrain shapes", unit="step", initial=run.step)
    progress.total = cfg.steps
    for step in progress:
        loss = _train_step(run, cfg, tokenizer)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss:.4f}")
        if cfg.save_every and step % cfg.save_every == 0 and step != cfg.steps:
            _save(run.ema, out_dir / f"step_{step}", cfg, step, time.perf_counter() - started)
            _save_run(run, out_dir / RESUME_FILE, cfg, model_cfg)
    _save_run(run, out_dir / RESUME_FILE, cfg, model_cfg)
    return _save(run.ema, out_dir, cfg, cfg.steps, time.perf_counter() - started)


def _new_run(cfg: PretrainConfig, model_cfg: TinyDiTConfig | TinyUNetConfig) -> _Run:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = TinyUNet(model_cfg) if isinstance(model_cfg, TinyUNetConfig) else TinyDiT(model_cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg))
    return _Run(model, ema, optimizer, schedule, rng, torch.Generator().manual_seed(cfg.seed))


def _train_step(run: _Run, cfg: PretrainConfig, tokenizer: Tokenizer) -> float:
    """One flow-matching step on fresh renders, then the EMA; returns the loss."""
    run.step += 1
    prompts = sample_prompts(run.rng, cfg.batch_size)
    x0 = render_batch(prompts, run.rng, cfg.distractor_rate)
    texts = training_captions(prompts, run.rng, cfg, run.step)
    noise = torch.randn(x0.shape, generator=run.generator)
    z = torch.randn(cfg.batch_size, generator=run.generator)
    t = torch.sigmoid(z * cfg.t_logit_std + cfg.t_logit_mean)  # logit-normal
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    v = run.model(x_t, t, run.model.encode_text(tokenizer(texts)))
    loss = (v - (noise - x0)).pow(2).mean()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"pretraining loss is {loss.item()} at step {run.step}")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.schedule.step()
    with torch.no_grad():
        decay = min(cfg.ema_decay, (1 + run.step) / (10 + run.step))
        for averaged, current in zip(run.ema.parameters(), run.model.parameters(), strict=True):
            averaged.lerp_(current, 1 - decay)
    return float(loss.detach())


def _resume_key(cfg: PretrainConfig, model_cfg: TinyDiTConfig | TinyUNetConfig) -> dict[str, dict[str, object]]:
    """What a saved run must share with the one that continues it (everything but its length)."""
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("steps", "save_every")}
    return {"pretrain": recipe, "architecture": asdict(model_cfg)}


def _flat(key: dict[str, dict[str, object]]) -> dict[str, str]:
    """``{"pretrain.lr": "0.001", ...}``: a resume key as comparable strings."""
    return {f"{group}.{name}": repr(value) for group, fields in key.items() for name, value in fields.items()}


def _set_fields(key: dict[str, dict[str, object]]) -> set[tuple[str, str]]:
    """The key's recipe fields that differ from their defaults: a field added to the recipe later defaults
    to the behaviour before it, so a run saved without it resumes under its default."""
    defaults = _flat({"pretrain": asdict(PretrainConfig())})
    return {(name, value) for name, value in _flat(key).items() if defaults.get(name) != value}


def _save_run(run: _Run, path: Path, cfg: PretrainConfig, model_cfg: TinyDiTConfig | TinyUNetConfig) -> None:
    state = {
        "key": _resume_key(cfg, model_cfg),
        "step": run.step,
        "steps": cfg.steps,  # the length it was run for: where its lr cooldown begins
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict(),
        "rng": run.rng.bit_generator.state,
        "generator": run.generator.get_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


def _check_cooldown_unchanged(path: Path, state: dict, cfg: PretrainConfig) -> None:
    """A run resumed with another length keeps the lr it was trained with only if its cooldown had not begun."""
    saved_steps = state.get("steps", cfg.steps)  # states without it predate the cooldown (lr_cooldown_steps 0)
    cooled = state["step"] > min(saved_steps, cfg.steps) - cfg.lr_cooldown_steps  # the saved steps span a cooldown
    if cfg.lr_cooldown_steps and saved_steps != cfg.steps and cooled:
        raise ConfigError(
            f"{path} is at step {state['step']} of a {saved_steps}-step run: with lr_cooldown_steps="
            f"{cfg.lr_cooldown_steps} its lr would differ from a run of steps={cfg.steps} made in one go; "
            f"resume it with --steps {saved_steps}, or start again"
        )


def _load_run(run: _Run, path: Path, cfg: PretrainConfig, model_cfg: TinyDiTConfig | TinyUNetConfig) -> None:
    state = torch.load(path, weights_only=False)
    differ = sorted({name for name, _ in _set_fields(_resume_key(cfg, model_cfg)) ^ _set_fields(state["key"])})
    if differ:
        raise ConfigError(
            f"{path} was written by another recipe (differs in {differ}); resume it with the same settings"
        )
    if state["step"] > cfg.steps:
        raise ConfigError(
            f"{path} is at step {state['step']}, past steps={cfg.steps}; ask for at least that many steps"
        )
    _check_cooldown_unchanged(path, state, cfg)
    run.model.load_state_dict(state["model"])
    run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    run.rng.bit_generator.state = state["rng"]
    run.generator.set_state(state["generator"])
    run.step = state["step"]


def _save(model: TinyDiT | TinyUNet, directory: Path, cfg: PretrainConfig, step: int, seconds: float) -> Path:
    recipe = {k: v for k, v in asdict(cfg).items() if k != "save_every"} | {"steps": step}  # what the weights depend on
    save_tiny_dit(model, directory, {"pretrain": recipe, "train_seconds": round(seconds, 1)})
    checksum = sha256_of(directory / "model.safetensors")
    (directory / "model.safetensors.sha256").write_text(f"{checksum}  model.safetensors\n")
    log.info("saved %s (step %d, sha256 %s)", directory, step, checksum[:12])
    return directory
