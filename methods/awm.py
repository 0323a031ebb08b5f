"""AWM: Advantage Weighted Matching (Xue et al., arXiv 2509.25050).

AWM replaces the reverse-process log-likelihood of DDPO/FlowGRPO by the pretraining
flow-matching loss on noised clean samples, weighted by the advantage (the notes' Part 2):

    L(θ) = E[ A · w(ℓ, t) · ℓ_θ(x_t) ],   ℓ_θ = mean_dims ‖v_θ(x_t, t, c) − (ε − x0)‖²,  x_t = (1 − t)·x0 + t·ε

Minimising it raises the likelihood of A > 0 samples and lowers it for A < 0. The official code
(``scxue/advantage_weighted_matching``, ``scripts/train_sd3_awm.py``, configs ``dgx_awm.py``)
writes it as a PPO objective on the surrogate log-likelihood ``log p = −w(ℓ, t)`` and adds the
stabilisers the notes list ("EMA-KL plus PPO-style clipping … never disable both constraints"):

* ratio ``ρ = exp(log p_θ − log p_old)`` per (sample, t), clipped surrogate
  ``max(−A·ρ, −A·clip(ρ, 1 ± ε))`` (``loss_type="exp_first"``; reuses :func:`methods.flow_grpo.grpo_loss`).
  On-policy with one optimizer step per collection ρ ≡ 1, so the gradient is exactly the paper's
  ``A·∇w(ℓ)``; clipping acts only across several optimizer steps or with ``off_policy``;
* the weighting ``w``: official ``"ghuber"``, ``w = ((ℓ + 1e-10)^p − 1e-10^p)·t/p`` with
  p = 0.25 (also ``"uniform"`` (w = ℓ, the paper's plain form), ``"t"``, ``"t2"``, ``"huber"``);
* advantages: per-prompt mean, global std (as FlowGRPO), clipped to ±A_max = 5 and rescaled by
  ``advantage_max/A_max`` = 1/5;
* KL to the frozen reference ``kl_coef·mean((v_θ − v_ref)²)`` (β = 0.001 GenEval since the official
  commit be51372 of 2026-03-27, 0.003 before it and for OCR, 1e-4 PickScore)
  and the EMA-KL ``ema_kl_coef·mean((v_θ − v_ema)²)`` (``ema_beta = 1``) to an EMA of θ updated once
  per collection, ``ema ← d·ema + (1 − d)·θ`` with ``d = min(0.3, 0.001·step)`` (``linear``).

The EMA that evaluation uses is the official ``EMAModuleWrapper`` with ``ema_decay = 0.99`` (all
official configs), stepped once per collection: ``eval_ema_decay = 0.99`` overrides the suite's
``train.optim.ema_max_decay`` (0.9) for AWM (:func:`harness.optim.method_ema_settings`). (Not to be
confused with ``ema_decay_max``, the official ``kl_ema_decay`` of the EMA-KL anchor.)

The EMA anchor lives in the Policy's "old" weight set. The official default is on-policy
(``off_policy=False``): collection uses θ itself, so "old" is then only the EMA-KL anchor, not
the sampler; with ``off_policy=True`` (the official option) it is both, as the Policy's "old"
semantics describe, and the old log-likelihoods come from it.

Paper/code vs here: Flow-Factory's suggested stabilisers (``ema_kl_beta 0.1``, ``clip_range 1e-5``)
are settings of the same fields. The official code only adds the EMA-KL when the reference KL is
on (``beta > 0``); here the two terms are independent (deviation: lets the Flow-Factory recipe,
EMA-KL without reference KL, be expressed). The official collector is the SA-solver (noise 0.4
for GenEval/OCR, 0 for PickScore), which the harness lacks; the default is the deterministic
multistep DPM-Solver++(2M), the nearest solver we share. Training times are the official
``time_type="discrete_wo_init"``: ``train_timesteps = 6`` stratified indices in
``[1, int(num_steps·timestep_fraction))`` of the 14-step sampling schedule, the same for every
sample of a micro-batch, each with its own noise.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from harness.accumulate import MicroBatch, accumulate
from harness.advantages import StdMode, group_advantages
from harness.optim import Optimization
from harness.policy import Policy, WeightSet, iter_batches, to_device
from harness.samplers import SAMPLERS, flow_schedule, make_sampler, noised
from harness.types import Prompt
from harness.validation import (
    check_at_least,
    check_fraction,
    check_literals,
    check_non_negative,
    check_positive,
    check_unit_interval,
)
from methods.base import Capabilities, Rollout
from methods.flow_grpo import grpo_loss
from methods.forward_process import collect_clean, flow_matching_error

Weighting = Literal["uniform", "t", "t2", "huber", "ghuber"]
WEIGHTINGS: tuple[Weighting, ...] = ("uniform", "t", "t2", "huber", "ghuber")


@dataclass(frozen=True, kw_only=True)
class AWMConfig:
    """AWM hyperparameters; defaults follow the official ``geneval_sd3_no_cfg`` config."""

    weighting: Weighting = "ghuber"  # w(ℓ, t) of the surrogate log-likelihood
    ghuber_power: float = 0.25  # p of the generalised Huber weighting
    adv_clip_max: float = 5.0  # A_max
    advantage_max: float = 1.0  # advantages rescaled to ±advantage_max after clipping
    std: StdMode = "global"
    clip_range: float = 1.0  # ε of the ratio clip (official 1; Flow-Factory suggests 1e-5)
    kl_coef: float = 0.001  # β: mean((v_θ − v_ref)²) (official GenEval 0.001; 0.003 OCR; 1e-4 PickScore)
    ema_kl_coef: float = 1.0  # ema_beta: mean((v_θ − v_ema)²) (Flow-Factory: 0.1)
    ema_decay_max: float = 0.3  # kl_ema_decay
    ema_decay_type: Literal["linear", "constant"] = "linear"  # linear: min(max, 0.001·step)
    off_policy: bool = False  # True: sample and take old log-likelihoods with the EMA ("old")
    sampler: str = "dpm2"  # official: SA-solver (not in the harness)
    num_steps: int = 14  # collection steps
    shift: float = 1.0
    guidance_scale: float = 1.0  # CFG-free
    train_timesteps: int = 6  # schedule steps trained per sample
    timestep_fraction: float = 0.9  # train indices drawn from [1, int(num_steps·fraction))
    optimizer_steps_per_iteration: int = 1
    train_batch_size: int = 64
    ema_interval: int = 1
    eval_ema_decay: float = 0.99  # official train.ema_decay of the evaluation EMA; overrides optim.ema_max_decay

    def __post_init__(self) -> None:
        check_literals(self)
        check_positive(self, "ghuber_power", "adv_clip_max", "advantage_max", "clip_range", "shift", "guidance_scale")
        check_non_negative(self, "kl_coef", "ema_kl_coef")
        check_unit_interval(self, "ema_decay_max", "eval_ema_decay")
        check_at_least(self, 2, "num_steps")
        check_at_least(self, 1, "train_timesteps", "optimizer_steps_per_iteration", "train_batch_size", "ema_interval")
        check_fraction(self, "timestep_fraction")
        if int(self.num_steps * self.timestep_fraction) < 1:
            raise ValueError(
                f"int(num_steps·timestep_fraction) must be >= 1, got num_steps={self.num_steps}, "
                f"timestep_fraction={self.timestep_fraction}"
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")


def awm_log_prob(fm_error: Tensor, t: Tensor, weighting: Weighting = "ghuber", power: float = 0.25) -> Tensor:
    """Surrogate log-likelihood ``−w(ℓ, t)`` of AWM (official ``compute_log_prob_awm``), (B,) float64.

    ``uniform``: ℓ; ``t``: ℓ·t; ``t2``: ℓ·t²; ``huber``: (sqrt(ℓ + 1e-10) − 1e-5)·t;
    ``ghuber``: ((ℓ + 1e-10)^p − 1e-10^p)·t/p.
    """
    loss, t = fm_error.double(), t.double()
    if weighting == "uniform":
        weighted = loss
    elif weighting == "t":
        weighted = loss * t
    elif weighting == "t2":
        weighted = loss * t**2
    elif weighting == "huber":
        weighted = (torch.sqrt(loss + 1e-10) - 1e-5) * t
    elif weighting == "ghuber":
        if not power > 0:
            raise ValueError(f"ghuber_power must be > 0, got {power}")
        weighted = ((loss + 1e-10) ** power - 1e-10**power) * t / power
    else:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    return -weighted


def awm_advantages(
    rewards: Tensor, group_ids: Tensor, *, std: StdMode, adv_clip_max: float, advantage_max: float
) -> Tensor:
    """``clip(A, ±A_max)·advantage_max/A_max`` with A the group-relative advantage (official ``train_sd3_awm.py``)."""
    advantages = group_advantages(rewards, group_ids, std=std).clamp(-adv_clip_max, adv_clip_max)
    return advantages / adv_clip_max * advantage_max


def awm_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    *,
    clip_range: float,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    ema_kl: Tensor | None = None,
    ema_kl_coef: float = 0.0,
) -> Tensor:
    """AWM objective: clipped surrogate on ``ρ = exp(log p − log p_old)`` plus both KL terms. Scalar.

    ``mean(max(−A·ρ, −A·clip(ρ, 1 ± ε))) + kl_coef·mean(kl) + ema_kl_coef·mean(ema_kl)``, all (B,).
    At ρ = 1 its gradient is ``mean(A·∇w(ℓ, t))``: the paper's advantage-weighted matching.
    """
    loss = grpo_loss(log_prob, old_log_prob, advantages, clip_range=clip_range, kl=kl, kl_coef=kl_coef)
    if ema_kl is not None:
        loss = loss + ema_kl_coef * ema_kl.mean()
    return loss


def ema_decay(step: int, decay_max: float, decay_type: str) -> float:
    """Decay of ``ema ← d·ema + (1 − d)·θ`` after ``step`` optimizer steps (official ``kl_ema_decay_type``)."""
    if decay_type == "constant":
        return decay_max
    if decay_type == "linear":
        return min(decay_max, 0.001 * step)
    raise ValueError(f"ema_decay_type must be 'linear' or 'constant', got {decay_type!r}")


def _mean_sq(a: Tensor, b: Tensor) -> Tensor:
    return ((a.double() - b.double()) ** 2).mean(dim=tuple(range(1, a.ndim)))


class AWM:
    """Advantage Weighted Matching on the common interface (see the module docstring)."""

    Config: ClassVar[type] = AWMConfig
    capabilities: ClassVar[Capabilities] = Capabilities(guidance_fields=("guidance_scale",), sampler_field="sampler")

    def __init__(self, cfg: AWMConfig, policy: Policy, optim: Optimization) -> None:
        self.cfg, self.policy, self.optim = cfg, policy, optim
        self.sampler = make_sampler(cfg.sampler)
        self.schedule = flow_schedule(cfg.num_steps, cfg.shift)
        self._chunk_seeds: list[int] = []
        self._old_log_probs: dict[tuple[int, int], Tensor] = {}
        policy.update_old(0.0)  # the EMA anchor starts as θ

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        weights: WeightSet = "old" if self.cfg.off_policy else "train"
        return collect_clean(self.policy, self.sampler, self.schedule, prompts, group_ids, generator,
                             guidance_scale=self.cfg.guidance_scale, weights=weights)  # fmt: skip

    def training_times(self, generator: torch.Generator) -> Tensor:
        """(train_timesteps,) times: stratified schedule indices without t = 1 (``discrete_wo_init``)."""
        cfg = self.cfg
        top = int(cfg.num_steps * cfg.timestep_fraction)
        bounds = torch.linspace(1, top, cfg.train_timesteps + 1).long()
        lower, upper = bounds[:-1], bounds[1:]
        index = lower + (torch.rand(cfg.train_timesteps, generator=generator) * (upper - lower)).long()
        return self.schedule[index]  # index ∈ [1, top − 1] ⊆ [1, num_steps − 1] (fraction ≤ 1 checked in the config)

    def _terms(self, rollout: Rollout, sel: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Surrogate log-likelihood (B,) and velocity of the active weights at (x_t, t)."""
        x0 = rollout.x0[sel]
        t = t.expand(len(sel))
        v = self.policy.velocity(noised(x0, noise, t), t, rollout.cond[sel])
        return awm_log_prob(flow_matching_error(v, x0, noise), t, self.cfg.weighting, self.cfg.ghuber_power), v

    def _chunk_draws(self, chunk: Tensor, seed: int, shape: torch.Size) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(sel, times (K,), noise (K, b, …)) per micro-batch of ``chunk``, from a generator seeded with ``seed``.

        Drawn identically on every call, so the old log-likelihoods (taken before the update) and the
        training pass see the same (t, ε); drawn on the CPU, moved to the chunk's device.
        """
        cfg, chunk_generator = self.cfg, torch.Generator().manual_seed(seed)
        draws = []
        for b in iter_batches(len(chunk), cfg.train_batch_size):
            sel = chunk[b]
            times = self.training_times(chunk_generator)
            noise = torch.randn((cfg.train_timesteps, len(sel), *shape), generator=chunk_generator)
            draws.append((sel, to_device(times, chunk.device), to_device(noise, chunk.device)))
        return draws

    def _old_log_likelihoods(self, rollout: Rollout, chunks: list[Tensor], generator: torch.Generator) -> None:
        """Each chunk's seed, then the old log-likelihoods of every pass, taken before this update's first step.

        On-policy, the first step's old log-likelihood is θ's own (ρ ≡ 1, no extra pass); later steps compare
        with θ before this update; off-policy, with the EMA (official).
        """
        cfg = self.cfg
        self._chunk_seeds = torch.randint(0, 2**62, (len(chunks),), generator=generator).tolist()
        self._old_log_probs = {}
        with torch.no_grad(), self.policy.use_weights("old" if cfg.off_policy else "train"):
            for c, chunk in enumerate(chunks):
                if c == 0 and not cfg.off_policy:
                    continue
                for b, (sel, times, noise) in enumerate(
                    self._chunk_draws(chunk, self._chunk_seeds[c], rollout.x0.shape[1:])
                ):
                    self._old_log_probs[c, b] = torch.stack(
                        [self._terms(rollout, sel, times[k], noise[k])[0] for k in range(cfg.train_timesteps)]
                    )

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        cfg = self.cfg
        advantages = awm_advantages(rewards, rollout.all_group_ids, std=cfg.std, adv_clip_max=cfg.adv_clip_max,
                                    advantage_max=cfg.advantage_max)  # fmt: skip
        advantages = rollout.mine(advantages)
        shape = rollout.x0.shape[1:]
        logs = accumulate(
            self.optim, torch.arange(len(advantages), device=advantages.device),
            functools.partial(self._loss, rollout, advantages),
            generator=generator, optimizer_steps=cfg.optimizer_steps_per_iteration, batch_size=cfg.train_batch_size,
            repeats=cfg.train_timesteps, pad=rollout.shared, equal_passes=rollout.equal_passes,
            on_chunks=lambda chunks, g: self._old_log_likelihoods(rollout, chunks, g),
            on_chunk=lambda c, chunk, _: self._chunk_draws(chunk, self._chunk_seeds[c], shape),
        )  # fmt: skip
        decay = ema_decay(self.optim.global_step, cfg.ema_decay_max, cfg.ema_decay_type)
        self.policy.update_old(decay)
        logs["train/ema_decay"] = decay
        logs["train/advantage_abs_mean"] = advantages.abs().mean().item()
        return logs

    def _loss(self, rollout: Rollout, advantages: Tensor, batch: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """AWM's loss of one micro-batch at its ``batch.repeat``-th training time (a filler: its own draws)."""
        cfg, policy, k = self.cfg, self.policy, batch.repeat
        if batch.filler:
            sel, times = batch.items, to_device(self.training_times(batch.generator), batch.items.device)
            noise = torch.randn((cfg.train_timesteps, 1, *rollout.x0.shape[1:]), generator=batch.generator)
            noise = to_device(noise, sel.device)
        else:
            sel, times, noise = batch.chunk_state[batch.index]
        log_prob, v_theta = self._terms(rollout, sel, times[k], noise[k])
        stored = self._old_log_probs.get((batch.chunk, batch.index))
        old = stored[k] if stored is not None and not batch.filler else log_prob.detach()
        kl = ema_kl = None
        if cfg.kl_coef > 0:
            with torch.no_grad(), policy.use_weights("ref"):
                kl = _mean_sq(v_theta, self._terms(rollout, sel, times[k], noise[k])[1])
        # deviation: the official code adds the EMA-KL only inside its ``beta > 0`` branch; here it
        # applies with kl_coef == 0 too (Flow-Factory's EMA-KL-only recipe).
        if cfg.ema_kl_coef > 0:
            with torch.no_grad(), policy.use_weights("old"):
                ema_kl = _mean_sq(v_theta, self._terms(rollout, sel, times[k], noise[k])[1])
        loss = awm_loss(log_prob, old, advantages[sel], clip_range=cfg.clip_range, kl=kl, kl_coef=cfg.kl_coef,
                        ema_kl=ema_kl, ema_kl_coef=cfg.ema_kl_coef)  # fmt: skip
        zero = torch.zeros((), dtype=torch.float64, device=log_prob.device)
        kl_mean = kl.mean() if kl is not None else zero
        ema_kl_mean = ema_kl.mean() if ema_kl is not None else zero
        ratio = torch.exp(log_prob.detach() - old)
        return loss, {
            "policy_loss": loss.detach() - cfg.kl_coef * kl_mean - cfg.ema_kl_coef * ema_kl_mean,
            "kl": kl_mean,
            "ema_kl": ema_kl_mean,
            "clipfrac": ((ratio - 1).abs() > cfg.clip_range).float().mean(),
        }
