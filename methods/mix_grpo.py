"""MixGRPO: GRPO inside a sliding window of SDE steps, ODE elsewhere (Li et al., arXiv 2507.21802;
official code Tencent-Hunyuan/MixGRPO, a fork of DanceGRPO).

Each iteration samples with a stochastic sampler only on the steps of a window ``[s_k, s_k + w)``
and the deterministic Euler ODE on every other step (the paper's mixed ODE–SDE sampling), stores the
window's latents and log-probs, and trains GRPO's clipped surrogate (DanceGRPO's loss, plus the
official optional ``kl_coef·½·mean((log p − log p_old)²)``) on exactly those steps. The window
moves through training (the paper's "progressive" strategy, official ``GRPOTrainingStates``): it starts at
step 0 and advances by the stride ``s`` (official ``prog_overlap_step``) every ``τ`` iterations (the
shift interval, official ``iters_per_group``); past the last start it rolls back to 0
(``roll_back``). The official window never holds the last two steps (``max_timesteps = T − 2``) and is
cut at that bound, so it shrinks near the end (and is empty at start T − 2: no training for τ
iterations, as the official code; MixGRPO-Flash crashes there, here it skips too).

**MixGRPO-Flash** (:data:`FLASH`): after the window the ODE runs DPM-Solver++(2M)
(``post_solver="dpm2"``, :class:`harness.samplers.DPMSolverPP2M`) on a compressed schedule
(:func:`flash_schedule`, official ``dpm_apply_strategy="post"``): the remaining steps are
``int((T − last)·ratio)`` points, ``ratio = 0.4`` (``dpm_post_compress_ratio``); steps before the
window stay Euler. :data:`FLASH_STAR` is Flash* (the window frozen at step 0, ratio 0.2).

Defaults are the official FLUX script (``finetune_flux_grpo_MixGRPO.sh``; the official code ships no
SD3.5-M GenEval config): 25 steps, shift 3, window w = 4, τ = 25, s = 1 with roll-back, FlowGRPO's
Flow-SDE inside the window (``--flow_grpo_sampling``; η = 0.7, σ_t = η·sqrt(t/(1 − t)); the
Dance-SDE is ``sde_type="dance_sde"``, the argparse default), clip 1e-4, A_max = 5, no KL,
DanceGRPO's group advantages (Bessel std + 1e-8), the same initial noise per prompt, 12 images
per prompt, one prompt per GPU with ``gradient_accumulation_steps = 3`` (4 optimizer steps per
iteration), no true CFG and no EMA (``eval_ema_decay = 0``).

Deviations: the official script sums per-reward advantages over several rewards
(``multi_reward_mix="advantage_aggr"``, HPSv2.1 + ImageReward + PickScore); the harness hands a method
one combined reward, so several rewards are weighted before the advantage (``reward_aggr``). The
model time ``int(1000·σ)/1000``, one-image-at-a-time sampling and in-order training are as in
:mod:`methods.dance_grpo`. The other official window strategies (``random``, ``decay``, ``exp_decay``)
and the DPM-Solver variants other than ++(2M) midpoint are not implemented. Flash compresses to at
least 2 points so that the trajectory ends at t = 0 (the official code stops short of it when the
product rounds to 1).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from harness.accumulate import MicroBatch, accumulate
from harness.optim import Optimization
from harness.policy import Cond, Policy, policy_device, to_device, unconditional
from harness.rollout import Trajectory, Window, replay_transition, rollout
from harness.samplers import DPMSolverPP2M, EulerODE, flow_schedule, make_sampler
from harness.types import Prompt
from harness.validation import (
    check_at_least,
    check_literals,
    check_non_negative,
    check_positive,
    check_unit_interval,
    require,
)
from methods.base import Capabilities, Rollout, collect_trajectory
from methods.dance_grpo import dance_advantages, initial_noise
from methods.flow_grpo import grpo_logs, grpo_loss

__all__ = ["FLASH", "FLASH_STAR", "MixGRPO", "MixGRPOConfig", "flash_schedule", "mix_grpo_loss", "window_start"]


@dataclass(frozen=True, kw_only=True)
class MixGRPOConfig:
    """MixGRPO hyperparameters; defaults follow the official FLUX script (``finetune_flux_grpo_MixGRPO.sh``)."""

    sde_type: Literal["flow_sde", "dance_sde"] = "flow_sde"  # the window's SDE (official: --flow_grpo_sampling)
    noise_level: float = 0.7  # η
    num_steps: int = 25  # sampling steps T
    shift: float = 3.0  # sd3_time_shift of the sampling schedule
    window_size: int = 4  # w (official group_size)
    shift_interval: int = 25  # τ: iterations per window position (official iters_per_group)
    window_stride: int = 1  # s: steps the window moves (official prog_overlap_step; 0 freezes it)
    roll_back: bool = True  # past the last start: back to step 0 (official --roll_back), else stay there
    post_solver: Literal["euler", "dpm2"] = "euler"  # ODE after the window: Euler, or DPM-Solver++(2M) (Flash)
    post_compress_ratio: float = 0.4  # Flash: steps after the window × ratio (official dpm_post_compress_ratio)
    clip_range: float = 1e-4  # ε of the clipped ratio
    adv_clip_max: float = 5.0  # A_max
    kl_coef: float = 0.0  # official kl_coeff (script: 0) on ½·mean((log p − log p_old)²)
    init_same_noise: bool = True  # one initial noise per prompt group
    guidance_scale: float = 1.0  # true CFG of the rollouts and the training log-prob (official FLUX: none)
    optimizer_steps_per_iteration: int = 4  # official: 12 samples per GPU, gradient_accumulation_steps 3
    train_batch_size: int = 64  # micro-batch size (official 1; a memory knob here)
    ema_interval: int = 1
    eval_ema_decay: float = 0.0  # official: no EMA, evaluation uses θ

    def __post_init__(self) -> None:
        check_literals(self)
        check_non_negative(self, "noise_level", "kl_coef")
        check_positive(self, "shift", "clip_range", "adv_clip_max", "guidance_scale", "post_compress_ratio")
        check_at_least(self, 3, "num_steps")  # the window holds steps [0, T − 2)
        check_at_least(self, 1, "window_size", "shift_interval", "optimizer_steps_per_iteration", "train_batch_size",
                       "ema_interval")  # fmt: skip
        check_at_least(self, 0, "window_stride")
        check_unit_interval(self, "eval_ema_decay")
        require(self.post_compress_ratio <= 1, "post_compress_ratio", self.post_compress_ratio, "in (0, 1]")

    @property
    def max_start(self) -> int:
        """The window's bound, official ``max_timesteps = T − 2``: it holds steps below it."""
        return self.num_steps - 2


FLASH = MixGRPOConfig(post_solver="dpm2", shift_interval=20)  # official MixGRPO-Flash script
FLASH_STAR = MixGRPOConfig(post_solver="dpm2", shift_interval=20, window_stride=0, post_compress_ratio=0.2)  # Flash*


def window_start(iteration: int, *, shift_interval: int, stride: int, max_start: int, roll_back: bool) -> int:
    """The window's first step at ``iteration`` (0-based), official progressive ``GRPOTrainingStates``.

    The start moves by ``stride`` every ``shift_interval`` iterations from 0; a start beyond ``max_start``
    rolls back to 0 (``roll_back``) or stays at ``max_start``.
    """
    moves = iteration // shift_interval
    if stride == 0:
        return 0
    if not roll_back:
        return min(stride * moves, max_start)
    return stride * (moves % (max_start // stride + 1))


def window_steps(start: int, size: int, max_start: int) -> range:
    """The window's steps, official ``range(start, min(start + size, max_timesteps))`` (may be empty)."""
    return range(start, min(start + size, max_start))


def flash_schedule(num_steps: int, shift: float, last: int, ratio: float) -> Tensor:
    """MixGRPO-Flash's schedule: ``flow_schedule(T, shift)`` up to step ``last + 1``, then a compressed tail.

    Official ``run_sample_step`` (``dpm_apply_strategy="post"``): ``n = int(max((T − last)·ratio, 1))``
    points ``linspace(u, 0, n)`` from the unshifted time ``u = linspace(1, 0, T + 1)[last + 1]``, shifted.
    # deviation: n >= 2 (the official tail stops short of t = 0 when n = 1).
    """
    n = max(int(max((num_steps - last) * ratio, 1)), 2)
    start = torch.linspace(1, 0, num_steps + 1)[last + 1].item()
    tail = torch.linspace(start, 0, n)
    tail = shift * tail / (1 + (shift - 1) * tail)
    return torch.cat([flow_schedule(num_steps, shift)[: last + 1], tail])


def mix_grpo_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, *, clip_range: float, kl_coef: float = 0.0
) -> Tensor:
    """GRPO's clipped surrogate (:func:`methods.flow_grpo.grpo_loss`) plus ``kl_coef·½·mean((log p − log p_old)²)``.

    The official ``kl_loss``: the k2 estimator of KL(old‖θ) on the per-step log-probs, all (B,).
    """
    loss = grpo_loss(log_prob, old_log_prob, advantages, clip_range=clip_range)
    return loss + kl_coef * 0.5 * ((log_prob - old_log_prob) ** 2).mean()


class MixGRPO:
    """MixGRPO (and MixGRPO-Flash) on the common interface (see the module docstring)."""

    Config: ClassVar[type] = MixGRPOConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_log_prob=True, needs_whole_groups=True, guidance_fields=("guidance_scale",)
    )

    def __init__(self, cfg: MixGRPOConfig, policy: Policy, optim: Optimization) -> None:
        self.cfg, self.policy, self.optim = cfg, policy, optim
        self.sampler = make_sampler(cfg.sde_type, cfg.noise_level)
        self.schedule = to_device(flow_schedule(cfg.num_steps, cfg.shift), policy_device(policy))
        self.iteration = 0  # collections so far: where the window is (saved with checkpoints)

    def state_dict(self) -> dict[str, int]:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.iteration = int(state["iteration"])

    def current_window(self) -> range:
        """This iteration's window steps (official: read, then advance once per iteration)."""
        cfg = self.cfg
        start = window_start(self.iteration, shift_interval=cfg.shift_interval, stride=cfg.window_stride,
                             max_start=cfg.max_start, roll_back=cfg.roll_back)  # fmt: skip
        return window_steps(start, cfg.window_size, cfg.max_start)

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        cfg = self.cfg
        steps, self.iteration = self.current_window(), self.iteration + 1
        noise = initial_noise(group_ids, self.policy.sample_shape, generator, same_per_group=cfg.init_same_noise)
        if not steps:  # an empty window (start T − 2): the ODE throughout, nothing to train
            texts = [p.text for p in prompts]
            cond, uncond = self.policy.encode(texts), unconditional(self.policy, len(texts), cfg.guidance_scale)
            x0 = rollout(self.policy, EulerODE(), cond, noise, self.schedule, guidance_scale=cfg.guidance_scale,
                         uncond=uncond).x0  # fmt: skip
            return Rollout(list(prompts), group_ids, cond, x0)
        flash = cfg.post_solver == "dpm2"
        schedule = self.schedule if not flash else flash_schedule(cfg.num_steps, cfg.shift, steps[-1],
                                                                  cfg.post_compress_ratio)  # fmt: skip
        window = Window(steps.start, len(steps), outside=EulerODE(), after=DPMSolverPP2M() if flash else None)
        return collect_trajectory(self.policy, self.sampler, prompts, group_ids, schedule, generator,
                                  guidance_scale=cfg.guidance_scale, noise=noise, window=window)  # fmt: skip

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        cfg, trajectory = self.cfg, rollout.trajectory
        if trajectory is None or trajectory.latents is None or trajectory.log_probs is None:
            return {"train/skipped": 1.0, "train/window_size": 0.0}  # an empty window: no SDE step to train
        advantages = dance_advantages(rewards, rollout.all_group_ids).clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
        advantages = rollout.mine(advantages)
        size = trajectory.log_probs.shape[1]
        start = int((self.schedule == trajectory.timesteps[0]).nonzero()[0])  # one read per iteration
        logs = {"train/window_start": float(start), "train/window_size": float(size)}
        logs |= accumulate(self.optim, torch.arange(len(advantages), device=advantages.device),
                           functools.partial(self._loss, trajectory, rollout.cond, advantages),
                           generator=generator, optimizer_steps=cfg.optimizer_steps_per_iteration,
                           batch_size=cfg.train_batch_size, repeats=size, pad=rollout.shared,
                           equal_passes=rollout.equal_passes)  # fmt: skip
        return logs

    def _loss(
        self, trajectory: Trajectory, cond_all: Cond, advantages: Tensor, batch: MicroBatch
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """MixGRPO's loss of one micro-batch at window step ``batch.repeat``."""
        cfg, sel, j = self.cfg, batch.items, batch.repeat
        assert trajectory.latents is not None and trajectory.log_probs is not None
        log_prob, _ = replay_transition(
            self.policy, self.sampler, trajectory, sel, j, cond_all[sel], cfg.guidance_scale
        )
        old_log_prob = trajectory.log_probs[sel, j]
        loss = mix_grpo_loss(log_prob, old_log_prob, advantages[sel], clip_range=cfg.clip_range, kl_coef=cfg.kl_coef)
        logs = grpo_logs(loss, log_prob, old_log_prob, None, kl_coef=0.0, clip_range=cfg.clip_range)
        return loss, logs
