"""FlowGRPO-Fast: FlowGRPO with the SDE only inside a window of steps (Liu et al., arXiv 2505.05470;
``yifan123/flow_grpo`` ``train_sd3_fast.py``, refactored form of 2025-10-14).

Per sampling call one window start is drawn uniformly, ``start ∈ [lo, hi − w]`` (inclusive), from
``sde_window_range = (lo, hi)``. A collection is sampled in calls of ``train_batch_size`` images
(the official code keeps its sampling batch equal to its training batch, FAQ: batch-size
invariance), each with its own window, so one collection mixes windows. Steps
``[start, start + w)`` use the stochastic sampler (Flow-SDE, Eq. 9, or CPS) and every other step
the deterministic Euler ODE (the SDE at noise level 0): the shared rollout with a
:class:`harness.rollout.Window`. Only the window's latents and log-probs
are stored, and only its ``w`` transitions are trained, with FlowGRPO's clipped-ratio loss
(:func:`methods.flow_grpo.grpo_loss`, Eq. 4–5) and group-relative advantages. Samples whose advantage
is exactly 0 are dropped and refilled to a multiple of ``filter_multiple`` as FlowGRPO does
(:func:`methods.flow_grpo.zero_advantage_filter`; the Fast script also refills when none is kept),
and the EMA is stepped per micro-batch (``ema_updates_per_step = 2``).

Defaults are the official CFG-free recipe (``geneval_sd3_fast_nocfg`` / ``pickscore_sd3_fast_nocfg``,
also :data:`NOCFG_RECIPE`): 10 steps, window 3 in [0, 5), ``sde_type="cps"`` with noise level 0.8,
2 optimizer steps per iteration (``gradient_accumulation_steps = num_batches_per_epoch // 2``),
guidance 1 in training and evaluation (``train.cfg=False``: "the RL process effectively performs
CFG distillation"), clip 1e-5 (FAQ: "set a relatively small clip_range, otherwise training may
crash"), β_KL = 0, global std. :data:`WITH_CFG` is *not* an official recipe: it was composed
here from FlowGRPO's full-trajectory settings (Flow-SDE a = 0.7, CFG 4.5, clip 1e-4, β_KL = 0.04)
restricted to a window of 2 (the original Fast form's ``train_num_steps=2``), as a CFG counterpart.

CPS log-probs follow the official code (``−mean((x_next − μ)²)``, no 1/(2s²)), so CPS clip ranges
do not transfer to the Flow-SDE (see :class:`harness.samplers.CPS`). The KL (when β_KL > 0) is
FlowGRPO's :func:`methods.flow_grpo.gaussian_kl_mean`, ``mean_dims(μ_θ − μ_ref)²/(2σ²)``, with σ
the Flow-SDE's σ_t (without sqrt(−dt)) or CPS's step std s.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from harness.accumulate import MicroBatch, accumulate
from harness.advantages import StdMode
from harness.optim import Optimization
from harness.policy import Cond, Policy, iter_batches, policy_device, to_device, unconditional
from harness.rollout import Trajectory, Window, replay_transition, rollout
from harness.samplers import Transition, flow_schedule, make_sampler
from harness.types import Prompt
from harness.validation import check_at_least, check_literals, check_non_negative, check_positive
from methods.base import Capabilities, Rollout
from methods.flow_grpo import SampleFilter, gaussian_kl_mean, grpo_logs, grpo_loss, kept_samples


def check_window(num_steps: int, size: int, window_range: tuple[int, int]) -> None:
    """A window of ``size`` steps fits in ``window_range = (lo, hi)`` within the steps before the last."""
    lo, hi = window_range
    if size < 1:
        raise ValueError(f"sde_window_size must be >= 1 (0 is plain FlowGRPO), got {size}")
    if not 0 <= lo <= hi - size or hi > num_steps - 1:
        # The last step (to t = 0) stays deterministic, as FlowGRPO never trains it.
        raise ValueError(
            f"a window of {size} must fit in sde_window_range {window_range} within steps [0, {num_steps - 1})"
        )


@dataclass(frozen=True, kw_only=True)
class FlowGRPOFastConfig:
    """FlowGRPO-Fast hyperparameters; defaults are the official CFG-free SD3 recipe."""

    sde_type: Literal["flow_sde", "cps"] = "cps"  # the window's stochastic sampler
    noise_level: float = 0.8  # a of the Flow-SDE, or η of CPS
    num_steps: int = 10
    shift: float = 1.0
    sde_window_size: int = 3  # w: stochastic (and trained) steps per trajectory
    sde_window_range: tuple[int, int] = (0, 5)  # (lo, hi): the window lies in steps [lo, hi)
    clip_range: float = 1e-5
    adv_clip_max: float = 5.0
    std: StdMode = "global"
    kl_coef: float = 0.0  # β_KL
    rollout_cfg: float = 1.0  # CFG scale of the collection
    train_cfg: float = 1.0  # CFG scale inside the training log-prob (must match the rollout's to be on-policy)
    optimizer_steps_per_iteration: int = 2  # official: gradient_accumulation_steps = num_batches_per_epoch // 2
    train_batch_size: int = 64
    sample_filter: SampleFilter = "zero_advantage"  # official; "zero_std_groups": drop only all-tied groups
    filter_multiple: int = 4  # official num_batches_per_epoch: kept samples per process refilled to a multiple
    ema_interval: int = 8
    ema_updates_per_step: int = 2  # official: EMA stepped after each of the 2 micro-batches per optimizer step

    def __post_init__(self) -> None:
        check_literals(self)
        check_non_negative(self, "noise_level", "kl_coef")
        check_positive(self, "clip_range", "adv_clip_max", "rollout_cfg", "train_cfg", "shift")
        check_at_least(self, 1, "num_steps", "optimizer_steps_per_iteration", "train_batch_size", "ema_interval",
                       "ema_updates_per_step", "filter_multiple", "sde_window_size")  # fmt: skip
        check_window(self.num_steps, self.sde_window_size, self.sde_window_range)


NOCFG_RECIPE = FlowGRPOFastConfig()  # official geneval/pickscore_sd3_fast_nocfg
# Composed here, not an official recipe: FlowGRPO's CFG settings on a window of 2 (module docstring).
WITH_CFG = FlowGRPOFastConfig(sde_type="flow_sde", noise_level=0.7, sde_window_size=2, clip_range=1e-4,
                              kl_coef=0.04, rollout_cfg=4.5, train_cfg=4.5)  # fmt: skip


def draw_window_start(num_steps: int, size: int, window_range: tuple[int, int], generator: torch.Generator) -> int:
    """``start ~ U{lo, …, hi − w}`` (official ``sde_window_range``), after checking the window fits."""
    check_window(num_steps, size, window_range)
    lo, hi = window_range
    return int(torch.randint(lo, hi - size + 1, (1,), generator=generator))


class FlowGRPOFast:
    """FlowGRPO-Fast on the common interface (see the module docstring)."""

    Config: ClassVar[type] = FlowGRPOFastConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_log_prob=True, trains_on_subset=True, guidance_fields=("rollout_cfg", "train_cfg")
    )

    def __init__(self, cfg: FlowGRPOFastConfig, policy: Policy, optim: Optimization) -> None:
        self.cfg, self.policy, self.optim = cfg, policy, optim
        self.sampler = make_sampler(cfg.sde_type, cfg.noise_level)  # the window's stochastic step
        self.schedule = to_device(flow_schedule(cfg.num_steps, cfg.shift), policy_device(policy))

    def _uncond(self, n: int, scale: float) -> Cond | None:
        return unconditional(self.policy, n, scale)

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        """One window per sampling call of ``train_batch_size`` images; per-sample window times (B, w + 1)."""
        cfg = self.cfg
        texts = [p.text for p in prompts]
        noise = torch.randn((len(texts), *self.policy.sample_shape), generator=generator)
        cond = self.policy.encode(texts)  # on-policy: sample with θ itself
        uncond = self._uncond(len(texts), cfg.rollout_cfg)
        parts = []
        for chunk in iter_batches(len(texts), cfg.train_batch_size):  # one sampling call, one window
            start = draw_window_start(cfg.num_steps, cfg.sde_window_size, cfg.sde_window_range, generator)
            part = rollout(self.policy, self.sampler, cond[chunk], noise[chunk], self.schedule,
                           guidance_scale=cfg.rollout_cfg, uncond=None if uncond is None else uncond[chunk],
                           generator=generator, keep_trajectory=True,
                           window=Window(start, cfg.sde_window_size))  # fmt: skip
            parts.append(dataclasses.replace(part, timesteps=part.timesteps.expand(part.x0.shape[0], -1)))
        trajectory = Trajectory(
            x0=torch.cat([p.x0 for p in parts]),
            timesteps=torch.cat([p.timesteps for p in parts]),
            latents=torch.cat([p.latents for p in parts if p.latents is not None]),
            log_probs=torch.cat([p.log_probs for p in parts if p.log_probs is not None]),
        )
        return Rollout(list(prompts), group_ids, cond, trajectory.x0, trajectory)

    def _replay(self, trajectory: Trajectory, sel: Tensor, j: int, cond: Cond) -> tuple[Tensor, Transition]:
        """Stored window transition j under the active weights (per-sample times: windows differ by chunk)."""
        return replay_transition(self.policy, self.sampler, trajectory, sel, j, cond, self.cfg.train_cfg)

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        cfg, trajectory = self.cfg, rollout.trajectory
        if trajectory is None or trajectory.latents is None or trajectory.log_probs is None:
            raise ValueError("FlowGRPOFast needs the window trajectory from its own collect")
        advantages, keep, none, logs = kept_samples(rewards, rollout, std=cfg.std, adv_clip_max=cfg.adv_clip_max,
                                                    rule=cfg.sample_filter, multiple=cfg.filter_multiple,
                                                    generator=generator, refill_empty=True)  # fmt: skip
        starts = (trajectory.timesteps[:, :1] == self.schedule).float().argmax(dim=1)  # (B,) schedule index
        logs["train/window_start"] = starts.float().mean().item()
        if none:
            logs["train/skipped"] = 1.0  # no sample with a learning signal anywhere in the batch: no step
            return logs
        logs |= accumulate(self.optim, keep, functools.partial(self._loss, trajectory, rollout.cond, advantages),
                           generator=generator, optimizer_steps=cfg.optimizer_steps_per_iteration,
                           batch_size=cfg.train_batch_size, repeats=trajectory.log_probs.shape[1], pad=rollout.shared,
                           equal_passes=rollout.equal_passes)  # fmt: skip
        return logs

    def _loss(
        self, trajectory: Trajectory, cond_all: Cond, advantages: Tensor, batch: MicroBatch
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """GRPO loss of one micro-batch at window transition ``batch.repeat``."""
        cfg, sel, j = self.cfg, batch.items, batch.repeat
        assert trajectory.log_probs is not None
        cond = cond_all[sel]
        log_prob, transition = self._replay(trajectory, sel, j, cond)
        old_log_prob = trajectory.log_probs[sel, j]
        kl = None
        if cfg.kl_coef > 0:
            with torch.no_grad(), self.policy.use_weights("ref"):
                _, reference = self._replay(trajectory, sel, j, cond)
            kl = gaussian_kl_mean(transition.mean, reference.mean, transition.sigma)
        loss = grpo_loss(log_prob, old_log_prob, advantages[sel], clip_range=cfg.clip_range, kl=kl, kl_coef=cfg.kl_coef)
        return loss, grpo_logs(loss, log_prob, old_log_prob, kl, kl_coef=cfg.kl_coef, clip_range=cfg.clip_range)
