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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.shapes.prompts import sample_prompts
from harness.policies.tiny_dit import TinyDiT, TinyDiTConfig, Tokenizer, save_tiny_dit
from harness.shapes_world.render import add_distractors, draw, layout
from harness.shapes_world.world import VOCABULARY
from harness.validation import check_at_least, check_finite, check_non_negative, check_positive, check_unit_interval

log = logging.getLogger(__name__)

BASE_ARCHITECTURE = TinyDiTConfig(vocabulary=VOCABULARY)  # the committed base's network
# Issue 15's replacement (docs/shapes.md): x-prediction and a full-resolution conv stem/head, trained with
# PretrainConfig(threads=1); it becomes BASE_ARCHITECTURE when its checkpoint replaces the committed base.
CANDIDATE_ARCHITECTURE = TinyDiTConfig(vocabulary=VOCABULARY, prediction="x", conv_channels=24)


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """Pretraining budget and optimiser; the defaults produce the committed base checkpoint."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    cond_dropout: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    distractor_rate: float = 0.0  # mean number of unmentioned objects per training image (Poisson)
    t_logit_mean: float = 0.0  # training times t = sigmoid(N(mean, std²)) (SD3's logit-normal)
    t_logit_std: float = 1.0
    seed: int = 0
    threads: int = 2  # fixed so that the CPU result does not depend on the machine's core count
    save_every: int = 0  # also write step-k checkpoints into <out>/step_<k> (0: only the final one)

    def __post_init__(self) -> None:
        check_at_least(self, 1, "steps", "batch_size", "warmup_steps", "threads")
        check_non_negative(self, "weight_decay", "distractor_rate", "save_every")
        check_unit_interval(self, "cond_dropout", "ema_decay")
        check_positive(self, "lr", "grad_clip", "t_logit_std")
        check_finite(self, "t_logit_mean")


def render_batch(prompts: list[dict], rng: np.random.Generator, distractor_rate: float = 0.0) -> torch.Tensor:
    """Renders in [−1, 1], (B, 3, H, W): each prompt's scene plus Poisson(``distractor_rate``) unmentioned objects."""
    images = np.stack([_render(md, rng, distractor_rate) for md in prompts])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _render(metadata: dict, rng: np.random.Generator, distractor_rate: float) -> np.ndarray:
    objects = layout(metadata, rng)
    if distractor_rate > 0:
        objects = add_distractors(objects, int(rng.poisson(distractor_rate)), rng)
    return draw(objects)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pretrain(cfg: PretrainConfig, out_dir: Path, model_cfg: TinyDiTConfig | None = None) -> Path:
    """Train from scratch and write the checkpoint folder; returns its path."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model_cfg = model_cfg or BASE_ARCHITECTURE
    model = TinyDiT(model_cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    tokenizer = Tokenizer(model_cfg.vocabulary, model_cfg.max_tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    generator = torch.Generator().manual_seed(cfg.seed)
    started = time.perf_counter()
    progress = tqdm(range(1, cfg.steps + 1), desc="pretrain shapes", unit="step")
    for step in progress:
        prompts = sample_prompts(rng, cfg.batch_size)
        x0 = render_batch(prompts, rng, cfg.distractor_rate)
        texts = [
            md["prompt"] if keep else ""
            for md, keep in zip(prompts, rng.random(cfg.batch_size) >= cfg.cond_dropout, strict=True)
        ]
        noise = torch.randn(x0.shape, generator=generator)
        z = torch.randn(cfg.batch_size, generator=generator)
        t = torch.sigmoid(z * cfg.t_logit_std + cfg.t_logit_mean)  # logit-normal
        x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        v = model(x_t, t, model.encode_text(tokenizer(texts)))
        loss = (v - (noise - x0)).pow(2).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for averaged, current in zip(ema.parameters(), model.parameters(), strict=True):
                averaged.lerp_(current, 1 - decay)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
        if cfg.save_every and step % cfg.save_every == 0 and step != cfg.steps:
            _save(ema, out_dir / f"step_{step}", cfg, step, time.perf_counter() - started)
    return _save(ema, out_dir, cfg, cfg.steps, time.perf_counter() - started)


def _save(model: TinyDiT, directory: Path, cfg: PretrainConfig, step: int, seconds: float) -> Path:
    recipe = {k: v for k, v in asdict(cfg).items() if k != "save_every"} | {"steps": step}  # what the weights depend on
    save_tiny_dit(model, directory, {"pretrain": recipe, "train_seconds": round(seconds, 1)})
    checksum = sha256_of(directory / "model.safetensors")
    (directory / "model.safetensors.sha256").write_text(f"{checksum}  model.safetensors\n")
    log.info("saved %s (step %d, sha256 %s)", directory, step, checksum[:12])
    return directory
