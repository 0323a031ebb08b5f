"""GRPO-Guard: FlowGRPO with RatioNorm and gradient reweighting (Wang et al., arXiv 2510.22319, CVPR 2026).

Official code: ``scripts/train_sd3_GRPO_Guard.py`` and ``config/grpo_guard.py``, added to yifan123/flow_grpo by
the paper's first author (commit 2e2f712, "GRPO-Guard"). The GitHub repository hxm2023/GRPO-Guard is an unrelated
LLM tool that shares the name.

FlowGRPO's per-step log-ratio under the Flow-SDE (Eq. 9) with ``x' = μ_old + s·ε`` and ``s = σ_t·sqrt(−Δt)`` is
``log ρ = mean(ε·Δμ)/s − mean(Δμ²)/(2s²)`` (``Δμ = μ_θ − μ_old``, means over non-batch dims): a negative bias that
grows at low-noise steps, and a scale that changes across steps. RatioNorm adds the bias back and rescales:

    b_t = mean(Δμ²) / (2s²),    log ρ̂ = (log p_θ − log p_old + b_t)·s = mean(ε·Δμ)

Gradient reweighting divides step t's clipped surrogate by ``−Δt`` (FlowGRPO's δ = 1/Δt). Both act only on the
policy loss; the optional KL (off in the official recipes) is FlowGRPO's :func:`gaussian_kl_mean`.

Official settings kept (``geneval_sd3_rationorm``): Flow-SDE rollouts (a = 0.7, 10 steps) with CFG 4.5 also inside
the training log-prob (``train.cfg = True``), ε = 2e-6, per-group reward std (``global_std = False``), no KL,
``timestep_fraction = 0.99``; the learning rate 1e-4 is the optimizer's (``OptimConfig.lr``). The official code's
bias ``b_t`` is one scalar per micro-batch: ``.mean(dim=tuple(range(1, log_prob.ndim)))`` on the (B,)-shaped
log-prob is ``mean(dim=())``, which torch reduces over *every* dim, samples included. That is the default
(``ratio_bias = "micro_batch"``, with the official per-GPU micro-batch of 9); the paper's per-sample ``b_t`` is
``ratio_bias = "per_sample"``. ``ratio_norm = False, reweight = False`` is FlowGRPO's loss.

The harness keeps the rollout's latents and log-probs but not its transition means, so μ_old is recomputed: the
first optimizer step of an update trains on-policy (θ = θ_old: μ_old is θ's own mean, detached); for later steps
μ_old is taken once before the update's first step (:func:`harness.accumulate.accumulate`'s ``on_chunks``), one
extra forward per trained transition that the official code gets from its sampler for free. Which samples train,
the two optimizer steps per collection and the EMA stepped per micro-batch are FlowGRPO's official ones
(:func:`methods.flow_grpo.kept_samples`, ``ema_updates_per_step``): the GRPO-Guard script shares that loop.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from harness.accumulate import MicroBatch, accumulate, filler_items, micro_batch_positions
from harness.advantages import StdMode
from harness.optim import Optimization
from harness.policy import Cond, Policy, policy_device, to_device
from harness.rollout import Trajectory, replay_transition
from harness.samplers import FlowSDE, Transition, flow_schedule
from harness.types import Prompt
from harness.validation import check_at_least, check_fraction, check_literals, check_non_negative, check_positive
from methods.base import Capabilities, Rollout, collect_trajectory
from methods.flow_grpo import SampleFilter, gaussian_kl_mean, grpo_logs, grpo_loss, kept_samples

__all__ = ["GRPOGuard", "GRPOGuardConfig", "grpo_guard_loss", "ratio_norm_log_ratio"]

RatioBias = Literal["micro_batch", "per_sample"]


@dataclass(frozen=True, kw_only=True)
class GRPOGuardConfig:
    """GRPO-Guard hyperparameters; defaults follow the official ``geneval_sd3_rationorm`` config."""

    noise_level: float = 0.7  # a in σ_t = a·sqrt(t/(1 − t)) (Flow-SDE only: RatioNorm assumes its Gaussian step)
    num_steps: int = 10  # collection steps T
    shift: float = 1.0  # schedule time shift; SD3.5 suites set 3.0 (official scheduler shift 3, docs/sd3.md)
    timestep_fraction: float = 0.99  # train on int(T·fraction) transitions: all but the last
    clip_range: float = 2e-6  # ε of clip(ρ̂, 1 − ε, 1 + ε) (official GenEval/OCR 2e-6, PickScore 4e-6)
    adv_clip_max: float = 5.0
    std: StdMode = "group"  # official GRPO-Guard configs: global_std = False
    kl_coef: float = 0.0  # β_KL on FlowGRPO's KL (official GRPO-Guard configs: 0)
    guidance_scale: float = 4.5  # CFG of the rollouts and of the training log-prob (official train.cfg = True)
    ratio_norm: bool = True  # RatioNorm: log ρ̂ = (log ρ + b_t)·s
    ratio_bias: RatioBias = "micro_batch"  # b_t averaged over the micro-batch (official) or per sample (paper)
    reweight: bool = True  # δ_t = 1/(−Δt) on the policy loss (official: on with rationorm)
    optimizer_steps_per_iteration: int = 2  # official: 2 per epoch of 48 groups
    train_batch_size: int = 9  # official per-GPU micro-batch: the set the official b_t averages over
    sample_filter: SampleFilter = "zero_advantage"  # official (FlowGRPO's filter); "zero_std_groups": tied groups
    filter_multiple: int = 8  # official num_batches_per_epoch (48 groups of 24 on 16 GPUs of 9)
    ema_interval: int = 8
    ema_updates_per_step: int = 4  # official: the EMA steps after each of the G = 8 // 2 micro-batches per step

    def __post_init__(self) -> None:
        check_literals(self)
        check_non_negative(self, "noise_level", "kl_coef")
        check_positive(self, "clip_range", "adv_clip_max", "guidance_scale", "shift")
        check_at_least(self, 1, "num_steps", "optimizer_steps_per_iteration", "train_batch_size", "ema_interval",
                       "filter_multiple", "ema_updates_per_step")  # fmt: skip
        check_fraction(self, "timestep_fraction")

    @property
    def train_steps(self) -> int:
        """The trained transitions per sample, ``int(T·timestep_fraction)`` (≥ 1)."""
        return max(1, int(self.num_steps * self.timestep_fraction))


def ratio_norm_log_ratio(
    log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor, *, bias: RatioBias
) -> Tensor:
    """RatioNorm (GRPO-Guard §4.2; official ``train_sd3_GRPO_Guard.py``): ``(log p_θ − log p_old + b_t)·s``, (B,).

    ``b_t = mean_dims(μ_θ − μ_old)²/(2s²)``, averaged over the micro-batch too with ``bias="micro_batch"``
    (official) or kept per sample (``"per_sample"``, paper); ``s = σ_t·sqrt(−Δt)`` is the step's std (B,) or
    (B, 1, …, 1). With the per-sample bias and ``x' = μ_old + s·ε`` this is exactly ``mean_dims(ε·(μ_θ − μ_old))``.
    """
    if bias not in ("micro_batch", "per_sample"):
        raise ValueError(f"bias must be 'micro_batch' or 'per_sample', got {bias!r}")
    s = std.flatten().float()
    squared = ((mean.float() - old_mean.float()) ** 2).mean(dim=tuple(range(1, mean.ndim)))  # (B,)
    if bias == "micro_batch":
        squared = squared.mean().expand_as(squared)
    return (log_prob - old_log_prob + squared / (2 * s**2)) * s


def grpo_guard_loss(
    log_ratio: Tensor,
    advantages: Tensor,
    dt: Tensor,
    *,
    clip_range: float,
    reweight: bool = True,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """GRPO-Guard's loss (official ``train_sd3_GRPO_Guard.py``): the clipped surrogate on ``ρ̂ = exp(log_ratio)``,
    divided by ``−Δt`` per sample with ``reweight`` (δ = 1/Δt, GRPO-Guard §4.3), plus ``kl_coef·mean(kl)``. Scalar.

    All inputs (B,); ``dt = t_next − t < 0``. The weight scales each sample's advantage, which is exact because
    ``max(−A·w·ρ, −A·w·clip(ρ)) = w·max(−A·ρ, −A·clip(ρ))`` for ``w > 0``.
    """
    if (dt >= 0).any():
        raise ValueError(f"dt must be < 0 (t_next < t), got max {dt.max().item()}")
    return _guard_loss(log_ratio, advantages, dt, clip_range=clip_range, reweight=reweight, kl=kl, kl_coef=kl_coef)


def _guard_loss(
    log_ratio: Tensor, advantages: Tensor, dt: Tensor, *, clip_range: float, reweight: bool, kl: Tensor | None,
    kl_coef: float,
) -> Tensor:  # fmt: skip
    """:func:`grpo_guard_loss` without its check of ``dt``, which reads it back: the method's Δt come from its
    schedule, decreasing by construction (``flow_schedule``)."""
    weight = 1.0 / (-dt.float()) if reweight else torch.ones_like(advantages)
    policy_loss = grpo_loss(log_ratio, torch.zeros_like(log_ratio), advantages * weight, clip_range=clip_range)
    return policy_loss + kl_coef * kl.mean() if kl is not None else policy_loss


class GRPOGuard:
    """GRPO-Guard on the common interface (see the module docstring)."""

    Config: ClassVar[type] = GRPOGuardConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_log_prob=True, trains_on_subset=True, guidance_fields=("guidance_scale",)
    )

    def __init__(self, cfg: GRPOGuardConfig, policy: Policy, optim: Optimization) -> None:
        self.cfg, self.policy, self.optim = cfg, policy, optim
        self.sampler = FlowSDE(cfg.noise_level)
        self.schedule = to_device(flow_schedule(cfg.num_steps, cfg.shift), policy_device(policy))  # decreasing: Δt < 0
        self._old_means: dict[tuple[int, int, int], Tensor] = {}  # (chunk, micro-batch, step) → μ_old

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        return collect_trajectory(self.policy, self.sampler, prompts, group_ids, self.schedule, generator,
                                  guidance_scale=self.cfg.guidance_scale)  # fmt: skip

    def _replay(self, trajectory: Trajectory, sel: Tensor, j: int, cond: Cond) -> tuple[Tensor, Transition]:
        return replay_transition(self.policy, self.sampler, trajectory, sel, j, cond, self.cfg.guidance_scale)

    def _take_old_means(self, rollout_: Rollout, chunks: list[Tensor], generator: torch.Generator) -> None:
        """μ_old of every pass of the update's later optimizer steps, under θ before its first step.

        Under FSDP each chunk's micro-batches are padded with filler forwards, as the passes themselves are.
        """
        cfg, trajectory = self.cfg, rollout_.trajectory
        assert trajectory is not None
        self._old_means = {}
        with torch.no_grad():
            for c, chunk in enumerate(chunks[1:], start=1):
                positions_list = micro_batch_positions(len(chunk), cfg.train_batch_size, rollout_.equal_passes)
                for b, positions in enumerate(positions_list):
                    sel = filler_items(chunk.device) if positions is None else chunk[positions]
                    for j in range(cfg.train_steps):
                        mean = self._replay(trajectory, sel, j, rollout_.cond[sel])[1].mean
                        if positions is not None:
                            self._old_means[c, b, j] = mean

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        cfg, trajectory = self.cfg, rollout.trajectory
        if trajectory is None or trajectory.log_probs is None or trajectory.latents is None:
            raise ValueError("GRPO-Guard needs rollouts with latents and log-probs (the Flow-SDE)")
        advantages, keep, none, logs = kept_samples(rewards, rollout, std=cfg.std, adv_clip_max=cfg.adv_clip_max,
                                                    rule=cfg.sample_filter, multiple=cfg.filter_multiple,
                                                    generator=generator)  # fmt: skip
        if none:
            logs["train/skipped"] = 1.0  # no sample with a learning signal anywhere in the batch: no step
            return logs
        loss_fn = functools.partial(self._loss, trajectory, rollout.cond, advantages)
        logs |= accumulate(self.optim, keep, loss_fn, generator=generator, optimizer_steps=cfg.optimizer_steps_per_iteration,
                           batch_size=cfg.train_batch_size, repeats=cfg.train_steps, pad=rollout.shared,
                           equal_passes=rollout.equal_passes,
                           on_chunks=lambda chunks, g: self._take_old_means(rollout, chunks, g))  # fmt: skip
        self._old_means = {}
        return logs

    def _loss(
        self, trajectory: Trajectory, cond_all: Cond, advantages: Tensor, batch: MicroBatch
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """GRPO-Guard loss of one micro-batch at training transition ``batch.repeat``."""
        cfg, sel, j = self.cfg, batch.items, batch.repeat
        assert trajectory.latents is not None and trajectory.log_probs is not None
        cond = cond_all[sel]
        log_prob, transition = self._replay(trajectory, sel, j, cond)
        old_log_prob = trajectory.log_probs[sel, j]
        stored = None if batch.filler else self._old_means.get((batch.chunk, batch.index, j))
        old_mean = transition.mean.detach() if stored is None else stored  # first step: θ = θ_old
        if cfg.ratio_norm:
            log_ratio = ratio_norm_log_ratio(log_prob, old_log_prob, transition.mean, old_mean, transition.std,
                                             bias=cfg.ratio_bias)  # fmt: skip
        else:
            log_ratio = log_prob - old_log_prob
        kl = None
        if cfg.kl_coef > 0:
            with torch.no_grad(), self.policy.use_weights("ref"):
                _, reference = self._replay(trajectory, sel, j, cond)
            kl = gaussian_kl_mean(transition.mean, reference.mean, transition.sigma)
        dt = (self.schedule[j + 1] - self.schedule[j]).expand(len(sel))
        loss = _guard_loss(log_ratio, advantages[sel], dt, clip_range=cfg.clip_range, reweight=cfg.reweight,
                           kl=kl, kl_coef=cfg.kl_coef)  # fmt: skip
        logs = grpo_logs(loss, log_prob, old_log_prob, kl, kl_coef=cfg.kl_coef, clip_range=cfg.clip_range)
        ratio = torch.exp(log_ratio.detach())
        return loss, logs | {
            "clipfrac": ((ratio - 1).abs() > cfg.clip_range).float().mean(),  # on ρ̂, as the official logs
            "clipfrac_gt_one": (ratio - 1 > cfg.clip_range).float().mean(),
            "clipfrac_lt_one": (1 - ratio > cfg.clip_range).float().mean(),
            "ratio_mean": ratio.mean(),
        }
