"""FlowGRPO: GRPO on the reverse process of a flow model (Liu et al., arXiv 2505.05470, NeurIPS 2025).

Rollouts run the Flow-SDE sampler (Eq. 9, σ_t = a·sqrt(t/(1 − t)), a = 0.7) and store the latents
and each transition's log-prob (a mean over non-batch dims, in fp32, as the official code). The
loss is PPO's clipped surrogate on the per-step ratio (Eq. 4–5) with group-relative advantages,
plus a KL to the frozen reference:

    KL = mean_dims(μ_θ − μ_ref)² / (2·σ_t²)

as the official ``scripts/train_sd3.py`` computes it. The paper's Eq. 10 divides by σ_t²·Δt and
sums over dims; the code omits Δt (absorbed into β, issues #22/#78) and averages: we follow the
code. Training covers every SDE transition but the last (``timestep_fraction = 0.99``). CFG is
set separately for the rollout, the training log-prob and evaluation (official: 4.5, empty-string
negative prompt).

Which samples train (``sample_filter``): the official code (``train_sd3.py``) drops every sample whose
advantage is exactly 0 and turns dropped samples back on at random until the kept count per process
is a multiple of ``num_batches_per_epoch`` (``filter_multiple = 4`` in the 32-GPU GenEval config), so
that its micro-batches are equal: :func:`zero_advantage_filter`, the default. ``"zero_std_groups"``
drops only whole groups whose rewards are all equal (the earlier harness rule; it keeps a sample
equal to its group's mean, about 0.5% of the samples with GenEval-like rewards).

The EMA that evaluation uses is stepped after every micro-batch in the official loop, so an update
step's decay applies G = ``gradient_accumulation_steps`` = 2 times (``ema_updates_per_step``, see
:mod:`harness.ema`): d² = 0.81 every 8th step instead of 0.9. The official GenEval config takes 2
optimizer steps per epoch (``optimizer_steps_per_iteration = 2``).

Rollouts and the loss share one sampler step, :class:`harness.samplers.FlowSDE`; gradients accumulate
through the shared inner loop :func:`harness.accumulate.accumulate`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from harness.accumulate import MicroBatch, accumulate
from harness.advantages import StdMode, group_advantages, zero_std_groups
from harness.optim import Optimization
from harness.policy import Cond, Policy, policy_device, to_device
from harness.rollout import Trajectory, replay_transition
from harness.samplers import FlowSDE, flow_schedule
from harness.types import Prompt
from harness.validation import check_at_least, check_fraction, check_literals, check_non_negative, check_positive
from methods.base import Capabilities, Rollout, collect_trajectory

__all__ = ["FlowGRPO", "FlowGRPOConfig", "gaussian_kl_mean", "grpo_logs", "grpo_loss", "zero_advantage_filter"]

log = logging.getLogger(__name__)

SampleFilter = Literal["zero_advantage", "zero_std_groups"]


@dataclass(frozen=True, kw_only=True)
class FlowGRPOConfig:
    """FlowGRPO hyperparameters; defaults follow the official SD3.5 GenEval config."""

    noise_level: float = 0.7  # a in σ_t = a·sqrt(t/(1 − t))
    num_steps: int = 10  # collection steps T
    shift: float = 1.0
    timestep_fraction: float = 0.99  # train on int(T·fraction) transitions: all but the last
    clip_range: float = 1e-4  # ε of the clipped ratio
    adv_clip_max: float = 5.0
    std: StdMode = "global"
    kl_coef: float = 0.04  # β_KL: 0.04 GenEval/OCR, 0.01 PickScore
    rollout_cfg: float = 4.5  # CFG scale for the rollouts
    train_cfg: float = 4.5  # CFG scale inside the training log-prob (must match the rollout's)
    optimizer_steps_per_iteration: int = 2  # official: 2 per epoch of 48 groups (grad_accum = num_batches // 2)
    train_batch_size: int = 64
    sample_filter: SampleFilter = "zero_advantage"  # official; "zero_std_groups": drop only all-tied groups
    filter_multiple: int = 4  # official num_batches_per_epoch: kept samples per process refilled to a multiple
    ema_interval: int = 8
    ema_updates_per_step: int = 2  # official: EMA stepped after each of the 2 micro-batches per optimizer step
    check_on_policy: bool = False  # debug: assert the first ratio of each collection is 1

    def __post_init__(self) -> None:
        check_literals(self)
        check_non_negative(self, "noise_level", "kl_coef")
        check_positive(self, "clip_range", "adv_clip_max", "rollout_cfg", "train_cfg", "shift")
        check_at_least(self, 1, "num_steps", "optimizer_steps_per_iteration", "train_batch_size", "ema_interval",
                       "ema_updates_per_step", "filter_multiple")  # fmt: skip
        check_fraction(self, "timestep_fraction")
        if self.check_on_policy and self.rollout_cfg != self.train_cfg:
            raise ValueError("check_on_policy needs rollout_cfg == train_cfg (otherwise the first ratio is never 1)")


def zero_advantage_filter(
    advantages: Tensor, multiple: int, generator: torch.Generator, *, refill_empty: bool = False
) -> Tensor:
    """(B,) bool: FlowGRPO's official sample filter (``train_sd3.py``) on this process's advantages (B,).

    Keep every sample whose advantage is not exactly 0. If the kept count is not a multiple of ``multiple``
    (official ``num_batches_per_epoch``), turn ``multiple − count % multiple`` dropped samples back on, the
    first of one ``randperm`` of the dropped ones (nothing when too few are dropped). ``refill_empty``
    (``train_sd3_fast.py``) also refills when nothing is kept.
    """
    if advantages.ndim != 1 or multiple < 1:
        raise ValueError(f"advantages must be (B,) and multiple >= 1, got {tuple(advantages.shape)}, {multiple}")
    mask = advantages != 0
    count = int(mask.sum())
    if count % multiple or (refill_empty and count == 0):
        dropped = (~mask).nonzero().flatten()
        missing = multiple - count % multiple
        if len(dropped) >= missing:
            chosen = torch.randperm(len(dropped), generator=generator)[:missing]
            mask[dropped[to_device(chosen, dropped.device)]] = True
    return mask


def kept_samples(
    rewards: Tensor, rollout: Rollout, *, std: StdMode, adv_clip_max: float, rule: SampleFilter, multiple: int,
    generator: torch.Generator, refill_empty: bool = False,
) -> tuple[Tensor, Tensor, bool, dict[str, float]]:  # fmt: skip
    """The GRPO batch every GRPO-family update starts from: this process's clipped group-relative advantages,
    its trained samples under ``rule`` (``"zero_advantage"`` or ``"zero_std_groups"``), whether the whole batch
    has none (every process then skips its step), and the filter's logs. The filter depends on the rewards, so
    its counts are read back here, once per iteration, before the inner loop."""
    advantages = group_advantages(rewards, rollout.all_group_ids, std=std).clamp(-adv_clip_max, adv_clip_max)
    tied = zero_std_groups(rewards, rollout.all_group_ids)
    if rule == "zero_advantage":
        mask = zero_advantage_filter(rollout.mine(advantages), multiple, generator, refill_empty=refill_empty)
        # The whole batch trains nothing only when no advantage is non-zero and no process refilled (equal shares).
        none = not bool((advantages != 0).any()) and not bool(mask.any())
    else:
        mask, none = ~rollout.mine(tied), bool(tied.all())
    logs = {"train/zero_std_ratio": tied.float().mean().item(), "train/kept_fraction": mask.float().mean().item()}
    return rollout.mine(advantages), mask.nonzero().flatten(), none, logs


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    *,
    clip_range: float,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """PPO clipped surrogate (Schulman et al. 2017, Eq. 7) on the per-step ratio, plus ``kl_coef·mean(kl)``.

    ``mean(max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)))`` with ``ρ = exp(log_prob − old_log_prob)``; all (B,).
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    if kl is not None:
        loss = loss + kl_coef * kl.mean()
    return loss


def grpo_logs(
    loss: Tensor, log_prob: Tensor, old_log_prob: Tensor, kl: Tensor | None, *, kl_coef: float, clip_range: float
) -> dict[str, Tensor]:
    """The diagnostics of one GRPO pass: policy loss (KL term removed), KL, approx. KL (k2) and clip fraction."""
    kl_mean = kl.detach().mean() if kl is not None else torch.zeros((), device=loss.device)
    delta = log_prob.detach() - old_log_prob
    return {
        "policy_loss": loss.detach() - kl_coef * kl_mean,
        "kl": kl_mean,
        "approx_kl": 0.5 * (delta**2).mean(),  # http://joschu.net/blog/kl-approx.html
        "clipfrac": ((torch.exp(delta) - 1).abs() > clip_range).float().mean(),
    }


def gaussian_kl_mean(mean: Tensor, mean_ref: Tensor, sigma: Tensor) -> Tensor:
    """FlowGRPO's per-sample KL ``mean_dims(μ_θ − μ_ref)² / (2σ²)``, (B,) (official ``train_sd3.py``).

    The KL of two Gaussians with one isotropic std, averaged over dims instead of summed; ``sigma``
    (B,) or (B, 1, …, 1) is the Flow-SDE's σ_t *without* sqrt(−dt) (the official code; the paper's
    Eq. 10 has σ_t²·Δt), or CPS's step std s in FlowGRPO-Fast.
    """
    return ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * sigma.flatten() ** 2)


class FlowGRPO:
    """FlowGRPO on the common interface (see the module docstring)."""

    Config: ClassVar[type] = FlowGRPOConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_log_prob=True, trains_on_subset=True, guidance_fields=("rollout_cfg", "train_cfg")
    )

    def __init__(self, cfg: FlowGRPOConfig, policy: Policy, optim: Optimization) -> None:
        if cfg.rollout_cfg != cfg.train_cfg:
            # Allowed for study, but the ratio then compares two different policies: never 1 on-policy.
            log.warning("rollout_cfg %s != train_cfg %s: the first ratio will not be 1", cfg.rollout_cfg, cfg.train_cfg)
        self.cfg, self.policy, self.optim = cfg, policy, optim
        self.sampler = FlowSDE(cfg.noise_level)
        self.schedule = to_device(flow_schedule(cfg.num_steps, cfg.shift), policy_device(policy))
        self._first_check = False  # check_on_policy: the next real pass checks its ratio

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        return collect_trajectory(self.policy, self.sampler, prompts, group_ids, self.schedule, generator,
                                  guidance_scale=self.cfg.rollout_cfg)  # fmt: skip

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        cfg, trajectory = self.cfg, rollout.trajectory
        if trajectory is None or trajectory.log_probs is None or trajectory.latents is None:
            raise ValueError("FlowGRPO needs rollouts with latents and log-probs (a stochastic sampler)")
        advantages, keep, none, logs = kept_samples(rewards, rollout, std=cfg.std, adv_clip_max=cfg.adv_clip_max,
                                                    rule=cfg.sample_filter, multiple=cfg.filter_multiple,
                                                    generator=generator)  # fmt: skip
        if none:
            logs["train/skipped"] = 1.0  # no sample with a learning signal anywhere in the batch: no step
            return logs
        self._first_check = cfg.check_on_policy
        loss_fn = functools.partial(self._loss, trajectory, rollout.cond, advantages)
        logs |= accumulate(self.optim, keep, loss_fn, generator=generator, optimizer_steps=cfg.optimizer_steps_per_iteration,
                           batch_size=cfg.train_batch_size, repeats=max(1, int(cfg.num_steps * cfg.timestep_fraction)),
                           pad=rollout.shared, equal_passes=rollout.equal_passes)  # fmt: skip
        return logs

    def _loss(
        self, trajectory: Trajectory, cond_all: Cond, advantages: Tensor, batch: MicroBatch
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """GRPO loss of one micro-batch at training transition ``batch.repeat`` (repeats: the trained steps)."""
        cfg, sel, j = self.cfg, batch.items, batch.repeat
        assert trajectory.latents is not None and trajectory.log_probs is not None
        cond = cond_all[sel]
        log_prob, transition = replay_transition(self.policy, self.sampler, trajectory, sel, j, cond, cfg.train_cfg)
        old_log_prob = trajectory.log_probs[sel, j]
        ratio = torch.exp(log_prob.detach() - old_log_prob)
        if self._first_check and not batch.filler:
            if not torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5):
                raise AssertionError(f"on-policy check: first ratio deviates from 1 by {(ratio - 1).abs().max():.2e}")
            self._first_check = False
        kl = None
        if cfg.kl_coef > 0:
            with torch.no_grad(), self.policy.use_weights("ref"):
                _, reference = replay_transition(self.policy, self.sampler, trajectory, sel, j, cond, cfg.train_cfg)
            kl = gaussian_kl_mean(transition.mean, reference.mean, transition.sigma)
        loss = grpo_loss(log_prob, old_log_prob, advantages[sel], clip_range=cfg.clip_range, kl=kl, kl_coef=cfg.kl_coef)
        return loss, grpo_logs(loss, log_prob, old_log_prob, kl, kl_coef=cfg.kl_coef, clip_range=cfg.clip_range)
