"""DGPO: Direct Group Preference Optimization (Luo, Hu & Tang, arXiv 2510.08425, ICLR 2026).

Official code: Luo-Yihong/DGPO (``scripts/train_sd3_dgpo.py``, ``config/dgpo.py``). DGPO trains on clean samples
of a deterministic solver (no SDE, no log-probs): a forward-process method like DiffusionNFT and Diffusion-DPO.
Each prompt group is split by the sign of the group-relative advantage A into G⁺ and G⁻, and the group-level
Bradley–Terry likelihood of G⁺ ≻ G⁻ is maximised with Diffusion-DPO's implicit reward
``−(ℓ_θ(x) − ℓ_ref(x))``, ``ℓ(x) = mean_dims‖v(x_t, t, c) − (ε − x)‖²``:

    S_g = (β/G)·Σ_{i∈g} A_i·(ℓ_θ,i − ℓ_ref,i),      L = mean_g −log σ(−S_g)

The official code implements its gradient: ``loss = mean_i sg(σ(S_g(i)))·A_i·ℓ_θ,i``
(``compute_group_dgpo_loss_allreduce``), whose gradient is ``∇L/β`` (the 1/β is absorbed by the learning rate):
:func:`dgpo_loss` is that form, :func:`dgpo_group_weights` the weights σ(S_g).

Official settings kept (``geneval_sd3_4gpu``, "Mode 1"): DPM-Solver++(2M) rollouts at 10 steps with CFG 4.5, the
conditional velocity (no CFG) in training, β = 100, a frozen-base reference with a KL ``kl_coef·mean((v_θ −
v_ref)²)``, kl_coef = 0.02 (``kl_cfg > 1`` puts CFG on the reference, the CFG-free "Mode 2"), per-group reward std,
``M = 4`` training times drawn once per update without replacement from the first ``trunc_steps + 1 = 5`` schedule
times and shared by every sample, one noise per prompt group (``use_shared_noise``), and the PPO-style clip
(``clip_dsm``): with ``ρ = exp(ℓ_old − ℓ_θ)`` a sample stops its gradient when ``A > 0`` and ``ρ > 1 + ε`` or
``A ≤ 0`` and ``ρ < 1 − ε`` (ε = 1e-2). "old" is the official ``ema_ref``, updated after every optimizer step with
decay ``min(0.3, 0.001·step)``; after ``switch_ema_ref`` steps the rollouts sample with it too, and
``reference="old"`` makes it the DGPO reference (``use_ema_ref``, TDM-R1). Every group trains, tied ones
included (A = 0), as the official code does. One optimizer step per collection; the evaluation EMA (0.9, every
8 steps) is stepped after each of the epoch's 2 micro-batches, as in FlowGRPO (``ema_updates_per_step = 2``).

A micro-batch is whole prompt groups (``train_batch_size`` groups), since σ(S_g) needs every member's error at
the same t and ε; the official code gathers a group across GPUs inside a micro-batch (an all-reduce) instead.
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
from harness.policy import Policy, WeightSet, guided_velocity, to_device, unconditional
from harness.samplers import flow_schedule, noised
from harness.types import Prompt
from harness.validation import check_at_least, check_literals, check_non_negative, check_positive, require
from methods.base import Capabilities, Rollout
from methods.forward_process import (
    check_sampler,
    collect_clean,
    flow_matching_error,
    group_members_on,
    make_collection_sampler,
)

__all__ = ["DGPO", "DGPOConfig", "dgpo_clip_mask", "dgpo_group_weights", "dgpo_loss"]


@dataclass(frozen=True, kw_only=True)
class DGPOConfig:
    """DGPO hyperparameters; defaults follow the official ``config/dgpo.py:geneval_sd3_4gpu``."""

    beta: float = 100.0  # β of the group preference (official train.beta_dpo; 10 for PickScore)
    kl_coef: float = 0.02  # weight of mean((v_θ − v_ref)²) (official train.beta; 0.001 for PickScore)
    kl_cfg: float = 1.0  # CFG scale of the frozen reference (KL and DGPO reference); 1: none
    reference: Literal["ref", "old"] = "ref"  # DGPO reference: frozen base (official) or the EMA "old" (use_ema_ref)
    clip_dsm: bool = True  # PPO-style clip of ℓ_θ against "old" (official clip_dsm)
    clip_range: float = 1e-2  # ε of that clip
    old_decay_max: float = 0.3  # "old" ← d·old + (1 − d)·θ after each step, d = min(old_decay_max, rate·step)
    old_decay_rate: float = 0.001
    switch_ema_ref: int = 500  # after this many optimizer steps the rollouts sample with "old"
    sampler: str = "dpm2"  # official: DPM-Solver multistep (any deterministic solver fits)
    noise_level: float = 0.7  # a stochastic sampler's noise (ignored by the ODE solvers; official 0)
    num_steps: int = 10  # collection steps
    shift: float = 1.0  # schedule time shift; SD3.5 suites set 3.0 (official flow_shift 3, docs/sd3.md)
    guidance_scale: float = 4.5  # CFG of the collection only (official Mode 1)
    train_timesteps: int = 4  # M: training times per update, shared by all samples
    trunc_steps: int = 4  # the M times are drawn from schedule indices 0..trunc_steps
    shared_noise: bool = True  # one ε per prompt group and pass (official use_shared_noise)
    std: StdMode = "group"  # official GenEval: global_std = False
    adv_clip_max: float = 5.0
    optimizer_steps_per_iteration: int = 1  # official: one step per epoch
    train_batch_size: int = 1  # prompt groups per micro-batch
    ema_interval: int = 8
    ema_updates_per_step: int = 2  # official: the EMA steps after each of the 2 micro-batches per optimizer step

    def __post_init__(self) -> None:
        check_literals(self)
        check_sampler(self.sampler)
        check_positive(self, "beta", "clip_range", "shift", "guidance_scale", "kl_cfg", "adv_clip_max")
        check_non_negative(self, "kl_coef", "noise_level", "old_decay_max", "old_decay_rate")
        require(self.old_decay_max <= 1, "old_decay_max", self.old_decay_max, "<= 1")
        require(self.kl_cfg >= 1, "kl_cfg", self.kl_cfg, ">= 1 (1: no CFG on the reference)")
        check_at_least(self, 0, "switch_ema_ref", "trunc_steps")
        check_at_least(self, 1, "num_steps", "train_timesteps", "optimizer_steps_per_iteration", "train_batch_size",
                       "ema_interval", "ema_updates_per_step")  # fmt: skip
        require(self.trunc_steps < self.num_steps, "trunc_steps", self.trunc_steps, f"< num_steps ({self.num_steps})")
        require(self.train_timesteps <= self.trunc_steps + 1, "train_timesteps", self.train_timesteps,
                f"<= trunc_steps + 1 ({self.trunc_steps + 1}): drawn without replacement")  # fmt: skip


def dgpo_group_weights(
    err_theta: Tensor, err_ref: Tensor, advantages: Tensor, group_index: Tensor, *, beta: float,
    n_groups: int | None = None,
) -> Tensor:  # fmt: skip
    """σ(S_g) for each sample's group, (B,): ``S_g = (β/G_g)·Σ_{i∈g} A_i·(ℓ_θ,i − ℓ_ref,i)`` on detached errors.

    ``group_index`` (B,) long in [0, n_groups); G_g is the group's size (the official divides by the configured
    group size, the same for complete groups). ``n_groups``: their number, when the caller knows it (otherwise
    it is read back from ``group_index``).
    """
    delta = (err_theta.detach() - err_ref.detach()).double()
    n_groups = int(group_index.max()) + 1 if n_groups is None else n_groups
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=group_index.device)
    sizes = zeros.index_add(0, group_index, torch.ones_like(delta))  # counted where they are, not read back
    sums = zeros.index_add(0, group_index, advantages.double() * delta)
    return torch.sigmoid(beta * sums / sizes)[group_index].float()


def dgpo_clip_mask(err_theta: Tensor, err_old: Tensor, advantages: Tensor, *, clip_range: float) -> Tensor:
    """The official PPO-style clip of DGPO (``clip_dsm``), (B,) bool: with ``ρ = exp(ℓ_old − ℓ_θ)``, clip when
    ``A > 0`` and ``ρ > 1 + ε``, or ``A ≤ 0`` and ``ρ < 1 − ε``."""
    ratio = torch.exp(err_old.detach() - err_theta.detach())
    return torch.where(advantages > 0, ratio > 1.0 + clip_range, ratio < 1.0 - clip_range)


def dgpo_loss(
    err_theta: Tensor,
    err_ref: Tensor,
    advantages: Tensor,
    group_index: Tensor,
    *,
    beta: float,
    clipped: Tensor | None = None,
    n_groups: int | None = None,
) -> Tensor:
    """DGPO's loss in the official gradient form, ``mean_i sg(σ(S_g(i)))·A_i·ℓ_θ,i`` (its gradient is
    ``∇ mean_g −log σ(−S_g)`` divided by β). Scalar; all inputs (B,). ``clipped`` samples keep their value but
    pass no gradient (official ``clip_dsm``); σ(S_g) uses every sample's error, clipped or not. ``n_groups``: as
    :func:`dgpo_group_weights`.
    """
    weights = dgpo_group_weights(err_theta, err_ref, advantages, group_index, beta=beta, n_groups=n_groups)
    trained = err_theta if clipped is None else torch.where(clipped, err_theta.detach(), err_theta)
    return (weights * advantages * trained).mean()


class DGPO:
    """DGPO on the common interface (see the module docstring)."""

    Config: ClassVar[type] = DGPOConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_whole_groups=True, guidance_fields=("kl_cfg", "guidance_scale"), sampler_field="sampler"
    )

    def __init__(self, cfg: DGPOConfig, policy: Policy, optim: Optimization) -> None:
        self.cfg, self.policy, self.optim = cfg, policy, optim
        self.sampler = make_collection_sampler(cfg.sampler, cfg.noise_level)
        self.schedule = flow_schedule(cfg.num_steps, cfg.shift)
        policy.update_old(0.0)  # the official ema_ref starts as θ

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        weights: WeightSet = "old" if self.optim.global_step > self.cfg.switch_ema_ref else "train"
        return collect_clean(self.policy, self.sampler, self.schedule, prompts, group_ids, generator,
                             guidance_scale=self.cfg.guidance_scale, weights=weights)  # fmt: skip

    def _start_chunk(self, c: int, chunk: Tensor, _: torch.Generator) -> list[int]:
        """Before each optimizer step but the first, step "old" (official ``ema_ref``); the chunk's items."""
        if c > 0:
            self._update_old()
        return chunk.tolist()

    def _update_old(self) -> float:
        """The official ``ema_ref`` step after an optimizer step (its decay uses the step count before it)."""
        decay = min(self.cfg.old_decay_max, self.cfg.old_decay_rate * (self.optim.global_step - 1))
        self.policy.update_old(max(decay, 0.0))
        return decay

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        cfg = self.cfg
        advantages = group_advantages(rewards, rollout.all_group_ids, std=cfg.std)
        advantages = rollout.mine(advantages.clamp(-cfg.adv_clip_max, cfg.adv_clip_max))
        groups = group_members_on(rollout.group_ids, advantages.device)  # this process's whole groups
        order = torch.randperm(cfg.trunc_steps + 1, generator=generator)[: cfg.train_timesteps]
        times = to_device(self.schedule[order], advantages.device)  # every sample's this update (official: every GPU's)
        loss_fn = functools.partial(self._loss, rollout, advantages, groups, times)
        # The items index the host list of groups (on the CPU); each chunk's are read once, as it starts.
        logs = accumulate(self.optim, torch.arange(len(groups)), loss_fn, generator=generator,
                          optimizer_steps=cfg.optimizer_steps_per_iteration, batch_size=cfg.train_batch_size,
                          repeats=cfg.train_timesteps, pad=rollout.shared, equal_passes=rollout.equal_passes,
                          on_chunk=self._start_chunk)  # fmt: skip
        logs["train/old_decay"] = self._update_old()
        logs["train/sampled_with_old"] = float(self.optim.global_step > cfg.switch_ema_ref)
        return logs

    def _velocities(self, x_t: Tensor, t: Tensor, rollout: Rollout, sel: Tensor) -> dict[str, Tensor]:
        """v_θ (with grad) and, where needed, the reference's (with ``kl_cfg``) and old's, without."""
        cfg, policy, cond = self.cfg, self.policy, rollout.cond[sel]
        out = {"theta": policy.velocity(x_t, t, cond)}
        with torch.no_grad():
            if cfg.kl_coef > 0 or cfg.reference == "ref":
                with policy.use_weights("ref"):
                    uncond = unconditional(policy, len(sel), cfg.kl_cfg)
                    out["ref"] = guided_velocity(policy, x_t, t, cond, uncond, cfg.kl_cfg)
            if cfg.clip_dsm or cfg.reference == "old":
                with policy.use_weights("old"):
                    out["old"] = policy.velocity(x_t, t, cond)
        return out

    def _loss(
        self, rollout: Rollout, advantages: Tensor, groups: list[Tensor], times: Tensor, batch: MicroBatch
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """DGPO's loss of one micro-batch of whole groups at the update's ``batch.repeat``-th time."""
        cfg = self.cfg
        members = [groups[g] for g in ([0] if batch.filler else batch.chunk_state[batch.positions])]  # filler: 0
        sel = torch.cat(members)
        group_index = to_device(torch.tensor([g for g, m in enumerate(members) for _ in range(len(m))]), sel.device)
        x0, t = rollout.x0[sel], times[batch.repeat].expand(len(sel))
        shape = (len(members) if cfg.shared_noise else len(sel), *x0.shape[1:])
        noise = to_device(torch.randn(shape, generator=batch.generator), x0.device).to(x0.dtype)
        noise = noise[group_index] if cfg.shared_noise else noise
        v = self._velocities(noised(x0, noise, t), t, rollout, sel)
        err = {name: flow_matching_error(velocity, x0, noise) for name, velocity in v.items()}
        a = advantages[sel]
        clipped = dgpo_clip_mask(err["theta"], err["old"], a, clip_range=cfg.clip_range) if cfg.clip_dsm else None
        policy_loss = dgpo_loss(err["theta"], err[cfg.reference], a, group_index, beta=cfg.beta, clipped=clipped,
                                n_groups=len(members))  # fmt: skip
        zero = torch.zeros((), device=x0.device)
        kl = ((v["theta"] - v["ref"]) ** 2).mean() if cfg.kl_coef > 0 else zero
        loss = policy_loss + cfg.kl_coef * kl
        return loss, {
            "loss": loss.detach(),
            "policy_loss": policy_loss.detach(),
            "kl": kl.detach(),
            "fm_error": err["theta"].detach().mean(),
            "clipfrac": clipped.float().mean() if clipped is not None else zero,
        }
