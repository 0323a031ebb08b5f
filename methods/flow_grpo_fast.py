"""FlowGRPO-Fast: FlowGRPO with the SDE only inside a window of steps (Liu et al., arXiv 2505.05470;
``yifan123/flow_grpo`` ``train_sd3_fast.py``, refactored form of 2025-10-14).

Per sampling call one window start is drawn uniformly, ``start ∈ [lo, hi − w]`` (inclusive), from
``sde_window_range = (lo, hi)``. A collection is sampled in calls of ``train_batch_size`` images
(the official code keeps its sampling batch equal to its training batch, FAQ: batch-size
invariance), each with its own window, so one collection mixes windows. Steps
``[start, start + w)`` use the stochastic sampler (Flow-SDE, Eq. 9, or CPS) and every other step
the deterministic Euler ODE (the SDE at noise level 0). Only the window's latents and log-probs
are stored, and only its ``w`` transitions are trained, with FlowGRPO's clipped-ratio loss
(:func:`methods.flow_grpo.grpo_loss`, Eq. 4–5) and group-relative advantages; groups whose
rewards are all equal are dropped, as FlowGRPO does.

Defaults are the official CFG-free recipe (``geneval_sd3_fast_nocfg`` / ``pickscore_sd3_fast_nocfg``,
also :data:`NOCFG_RECIPE`): 10 steps, window 3 in [0, 5), ``sde_type="cps"`` with noise level 0.8,
guidance 1 in training and evaluation (``train.cfg=False``: "the RL process effectively performs
CFG distillation"), clip 1e-5 (FAQ: "set a relatively small clip_range, otherwise training may
crash"), β_KL = 0, global std. :data:`WITH_CFG` is *not* an official recipe: it was composed
here from FlowGRPO's full-trajectory settings (Flow-SDE a = 0.7, CFG 4.5, clip 1e-4, β_KL = 0.04)
restricted to a window of 2 (the original Fast form's ``train_num_steps=2``), as a CFG counterpart.

CPS log-probs follow the official code (``−mean((x_next − μ)²)``, no 1/(2s²)), so CPS clip ranges
do not transfer to the Flow-SDE (see :class:`harness.samplers.CPS`). The KL (when β_KL > 0) is
FlowGRPO's :func:`methods.flow_grpo.gaussian_kl_mean`, ``mean_dims(μ_θ − μ_ref)²/(2σ²)``, with σ
the Flow-SDE's σ_t (without sqrt(−dt)) or CPS's step std s. The window rollout is written here
(the shared :func:`harness.rollout.rollout` has no window); it reuses the shared sampler steps and
guidance, and counts through the same meter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from benchmarks.base import Prompt
from harness.advantages import StdMode, group_advantages, zero_std_groups
from harness.optim import Optimization
from harness.policy import Cond, Policy, guided_velocity, iter_batches
from harness.rollout import Trajectory
from harness.samplers import CPS, EulerODE, flow_schedule, flow_sde_step
from methods.base import FILLER, Rollout, micro_batches, optimizer_chunks
from methods.flow_grpo import gaussian_kl_mean, grpo_loss


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
    optimizer_steps_per_iteration: int = 1
    train_batch_size: int = 64
    ema_interval: int = 8


NOCFG_RECIPE = FlowGRPOFastConfig()  # official geneval/pickscore_sd3_fast_nocfg
# Composed here, not an official recipe: FlowGRPO's CFG settings on a window of 2 (module docstring).
WITH_CFG = FlowGRPOFastConfig(sde_type="flow_sde", noise_level=0.7, sde_window_size=2, clip_range=1e-4,
                              kl_coef=0.04, rollout_cfg=4.5, train_cfg=4.5)  # fmt: skip


def draw_window_start(num_steps: int, size: int, window_range: tuple[int, int], generator: torch.Generator) -> int:
    """``start ~ U{lo, …, hi − w}`` (official ``sde_window_range``), after checking the window fits."""
    lo, hi = window_range
    if size < 1:
        raise ValueError(f"sde_window_size must be >= 1 (0 is plain FlowGRPO), got {size}")
    if not 0 <= lo <= hi - size or hi > num_steps - 1:
        # The last step (to t = 0) stays deterministic, as FlowGRPO never trains it.
        raise ValueError(
            f"a window of {size} must fit in sde_window_range {window_range} within steps [0, {num_steps - 1})"
        )
    return int(torch.randint(lo, hi - size + 1, (1,), generator=generator))


def window_step(
    sde_type: str, noise_level: float, v: Tensor, x: Tensor, t: Tensor, t_next: Tensor, x_next: Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """One stochastic window step: ``(x_next, log_prob, mean, σ)`` in the sampler's log-prob convention.

    Flow-SDE: :func:`harness.samplers.flow_sde_step` (σ = σ_t without sqrt(−dt), as FlowGRPO's KL);
    CPS: :class:`harness.samplers.CPS` (σ = its step std s). ``x_next`` given: its log-prob (training).
    """
    if sde_type == "flow_sde":
        return flow_sde_step(v, x, t, t_next, noise_level=noise_level, prev_sample=x_next, generator=generator)
    if sde_type == "cps":
        sampler = CPS(noise_level)
        if x_next is None:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
            transition = sampler.step(v, x, t, t_next, noise=noise)
            x_next = transition.x_next
        else:
            transition = sampler.step(v, x, t, t_next, noise=torch.zeros_like(x, dtype=torch.float32))
        return x_next, sampler.log_prob(x_next, transition), transition.mean, transition.std
    raise ValueError(f"sde_type must be 'flow_sde' or 'cps', got {sde_type!r}")


@torch.no_grad()
def window_rollout(
    policy: Policy, cfg: FlowGRPOFastConfig, schedule: Tensor, cond: Cond, uncond: Cond | None, noise: Tensor,
    start: int, generator: torch.Generator,
) -> Trajectory:  # fmt: skip
    """Euler ODE outside ``[start, start + w)``, the SDE inside; keeps only the window's latents and log-probs.

    The returned trajectory's ``timesteps`` are each sample's ``w + 1`` window times, (B, w+1) (per
    sample, not the (K+1,) of a full trajectory, since a collection's chunks have their own windows),
    ``latents`` (B, w+1, ...) and ``log_probs`` (B, w).
    """
    x, ode = noise, EulerODE()
    end = start + cfg.sde_window_size
    latents, log_probs = [], []
    for k in range(len(schedule) - 1):
        t, t_next = schedule[k], schedule[k + 1]
        v = guided_velocity(policy, x, t.expand(x.shape[0]), cond, uncond, cfg.rollout_cfg)
        if start <= k < end:
            latents.append(x)
            x_next, log_prob, _, _ = window_step(cfg.sde_type, cfg.noise_level, v, x, t, t_next, None, generator)
            log_probs.append(log_prob)
        else:
            x_next = ode.step(v, x, t, t_next).x_next
        x = x_next.to(noise.dtype)
        if k == end - 1:
            latents.append(x)
    times = schedule[start : end + 1].expand(x.shape[0], -1)
    return Trajectory(x0=x, timesteps=times, latents=torch.stack(latents, dim=1),
                      log_probs=torch.stack(log_probs, dim=1))  # fmt: skip


class FlowGRPOFast:
    """FlowGRPO-Fast on the common interface (see the module docstring)."""

    Config: ClassVar[type] = FlowGRPOFastConfig
    needs_log_prob: ClassVar[bool] = True

    def __init__(self, cfg: FlowGRPOFastConfig, policy: Policy, optim: Optimization) -> None:
        if cfg.sde_type not in ("flow_sde", "cps"):
            raise ValueError(f"sde_type must be 'flow_sde' or 'cps', got {cfg.sde_type!r}")
        draw_window_start(cfg.num_steps, cfg.sde_window_size, cfg.sde_window_range, torch.Generator())  # validates
        self.cfg, self.policy, self.optim = cfg, policy, optim
        self.schedule = flow_schedule(cfg.num_steps, cfg.shift)

    def _uncond(self, n: int, scale: float) -> Cond | None:
        return self.policy.encode([""] * n) if scale != 1.0 else None

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        cfg = self.cfg
        texts = [p.text for p in prompts]
        noise = torch.randn((len(texts), *self.policy.sample_shape), generator=generator)
        cond = self.policy.encode(texts)  # on-policy: sample with θ itself
        uncond = self._uncond(len(texts), cfg.rollout_cfg)
        parts = []
        for chunk in iter_batches(len(texts), cfg.train_batch_size):  # one sampling call, one window
            start = draw_window_start(cfg.num_steps, cfg.sde_window_size, cfg.sde_window_range, generator)
            chunk_uncond = None if uncond is None else uncond[chunk]
            parts.append(
                window_rollout(
                    self.policy, cfg, self.schedule, cond[chunk], chunk_uncond, noise[chunk], start, generator
                )
            )
        trajectory = Trajectory(
            x0=torch.cat([p.x0 for p in parts]),
            timesteps=torch.cat([p.timesteps for p in parts]),
            latents=torch.cat([p.latents for p in parts if p.latents is not None]),
            log_probs=torch.cat([p.log_probs for p in parts if p.log_probs is not None]),
        )
        return Rollout(list(prompts), group_ids, cond, trajectory.x0, trajectory)

    def _step_terms(self, trajectory: Trajectory, sel: Tensor, j: int, cond: Cond) -> tuple[Tensor, Tensor, Tensor]:
        """Log-prob under the active weights of stored window transition j, its mean and σ."""
        x, x_next = trajectory.latents[sel, j], trajectory.latents[sel, j + 1]
        t, t_next = trajectory.timesteps[sel, j], trajectory.timesteps[sel, j + 1]  # (b,): windows differ by chunk
        v = guided_velocity(self.policy, x, t, cond, self._uncond(len(sel), self.cfg.train_cfg),
                            self.cfg.train_cfg)  # fmt: skip
        _, log_prob, mean, sigma = window_step(self.cfg.sde_type, self.cfg.noise_level, v, x, t, t_next, x_next)
        return log_prob, mean, sigma

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        cfg, policy, trajectory = self.cfg, self.policy, rollout.trajectory
        if trajectory is None or trajectory.latents is None or trajectory.log_probs is None:
            raise ValueError("FlowGRPOFast needs the window trajectory from its own collect")
        advantages = group_advantages(rewards, rollout.all_group_ids, std=cfg.std).clamp(-cfg.adv_clip_max,
                                                                                         cfg.adv_clip_max)  # fmt: skip
        advantages = rollout.mine(advantages)
        dropped = zero_std_groups(rewards, rollout.all_group_ids)
        keep = (~rollout.mine(dropped)).nonzero().flatten()
        starts = (trajectory.timesteps[:, :1] == self.schedule).float().argmax(dim=1)  # (B,) schedule index
        logs = {
            "train/zero_std_ratio": dropped.float().mean().item(),
            "train/window_start": starts.float().mean().item(),
        }
        if dropped.all():
            logs["train/skipped"] = 1.0  # every group had all-equal rewards: no signal, no step
            return logs
        chunks = optimizer_chunks(keep, cfg.optimizer_steps_per_iteration, generator, pad=rollout.shared)
        n_train = trajectory.log_probs.shape[1]
        stats = {"policy_loss": 0.0, "kl": 0.0, "approx_kl": 0.0, "clipfrac": 0.0}
        for chunk in chunks:
            batches = micro_batches(rollout, chunk, cfg.train_batch_size)
            passes = n_train * sum(batch is not None for batch in batches)
            for j in range(n_train):
                for batch in batches:
                    sel = FILLER if batch is None else batch
                    cond = rollout.cond[sel]
                    log_prob, mean, sigma = self._step_terms(trajectory, sel, j, cond)
                    old_log_prob = trajectory.log_probs[sel, j]
                    kl = None
                    if cfg.kl_coef > 0:
                        with torch.no_grad(), policy.use_weights("ref"):
                            _, mean_ref, _ = self._step_terms(trajectory, sel, j, cond)
                        kl = gaussian_kl_mean(mean, mean_ref, sigma)
                    loss = grpo_loss(log_prob, old_log_prob, advantages[sel], clip_range=cfg.clip_range, kl=kl,
                                     kl_coef=cfg.kl_coef)  # fmt: skip
                    self.optim.backward(loss, scale=0.0 if batch is None else 1.0 / passes)
                    if batch is None:  # a filler pass (micro_batches): the same passes, nothing learned or logged
                        continue
                    ratio = torch.exp(log_prob.detach() - old_log_prob)
                    scale = 1.0 / passes / len(chunks)
                    kl_value = kl.mean().item() if kl is not None else 0.0
                    stats["policy_loss"] += (loss.item() - cfg.kl_coef * kl_value) * scale
                    stats["kl"] += kl_value * scale
                    stats["approx_kl"] += 0.5 * ((log_prob.detach() - old_log_prob) ** 2).mean().item() * scale
                    stats["clipfrac"] += ((ratio - 1).abs() > cfg.clip_range).float().mean().item() * scale
            logs["train/grad_norm"] = self.optim.step()
        logs.update({f"train/{k}": v for k, v in stats.items()})
        return logs
