"""Online Flow-DPO: Diffusion-DPO on each group's best-vs-worst pair, with a refreshed reference.

Diffusion-DPO (Wallace et al., arXiv 2311.12908, CVPR 2024, Eq. 14) with the flow-matching
target (Flow-DPO, Liu et al. arXiv 2501.13918), run online as FlowGRPO's baseline
(``scripts/train_sd3_dpo.py``): per prompt group the best sample is the winner x_w and the worst
the loser x_l (``stat_tracking.py`` type ``"dpo"``); both are noised with the *same* t and ε, and

    ℓ(x) = mean_dims ‖v(x_t, t, c) − (ε − x)‖²
    L(θ) = −log σ( −(β/2)·[ (ℓ_θ(x_w) − ℓ_ref(x_w)) − (ℓ_θ(x_l) − ℓ_ref(x_l)) ] )

The notes write ``−β T ω(λ_t)``; the official code folds ``T·ω`` into β and uses ``−0.5·β``
(as Diffusion-DPO's own training script): we follow the code, β = 100 (notes: "too-small β
collapses"; the MSE is a mean over dims, so β does not depend on the image size and the SD3
value is kept for the tiny model).

Reference and sampling policy. In the official script one LoRA adapter, "ref", is both the
collection policy (sampling uses ``set_adapter("ref")``) and the DPO reference, and it is
overwritten with θ every ``ref_update_step = 40`` optimizer steps ("online"). That is exactly the
Policy's "old" weight set (the sampling policy), refreshed with ``update_old(0.0)``; so the
default ``reference="old"`` uses one weight set for both roles as the official code does, and
there is no conflict with the sampling semantics. ``reference="ref"`` uses the frozen initial
model as the DPO reference instead (the offline-style anchor), still sampling with "old".

Official settings kept: Flow-SDE collection (a = 0.7) with CFG 4.5 and 40 steps, training on the
conditional velocity only (no CFG in the loss), logit-normal training times with
``int(num_steps·timestep_fraction)`` fresh (t, ε) draws per pair, EMA every 8 steps. When a group
has all-equal rewards the official code still trains on its second (as x_w) and first (as x_l)
sample; ``drop_tied_groups=True`` skips such groups instead.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.accumulate import MicroBatch, accumulate
from harness.optim import Optimization
from harness.policy import Cond, Policy, to_device
from harness.samplers import flow_schedule, noised
from harness.types import Prompt
from harness.validation import check_at_least, check_fraction, check_literals, check_non_negative, check_positive
from methods.base import Capabilities, Rollout
from methods.forward_process import (
    check_sampler,
    collect_clean,
    crossed_multiple,
    flow_matching_error,
    group_members,
    logit_normal_times,
    make_collection_sampler,
)


@dataclass(frozen=True, kw_only=True)
class OnlineDPOConfig:
    """Online Flow-DPO hyperparameters; defaults follow FlowGRPO's ``train_sd3_dpo.py``."""

    beta: float = 100.0  # β of Diffusion-DPO (inside term −β/2·Δ)
    reference: Literal["old", "ref"] = "old"  # "old": the refreshed sampling policy (official); "ref": frozen base
    ref_update_step: int = 40  # optimizer steps between θ → old copies
    sampler: str = "flow_sde"
    noise_level: float = 0.7  # a of the Flow-SDE (ignored by deterministic samplers)
    num_steps: int = 40  # collection steps (official online DPO)
    shift: float = 1.0
    guidance_scale: float = 4.5  # CFG of the collection only; training uses the conditional velocity
    timestep_fraction: float = 0.99  # (t, ε) draws per pair: int(num_steps·fraction)
    drop_tied_groups: bool = False  # official: an all-equal group still yields a pair
    optimizer_steps_per_iteration: int = 1
    train_batch_size: int = 32  # pairs per forward (2× samples)
    ema_interval: int = 8

    def __post_init__(self) -> None:
        check_literals(self)
        check_sampler(self.sampler)
        check_positive(self, "beta", "shift", "guidance_scale")
        check_non_negative(self, "noise_level")
        check_at_least(self, 1, "ref_update_step", "num_steps", "optimizer_steps_per_iteration", "train_batch_size",
                       "ema_interval")  # fmt: skip
        check_fraction(self, "timestep_fraction")


def preference_pairs(rewards: Tensor, group_ids: Tensor, drop_tied_groups: bool = False) -> tuple[Tensor, Tensor]:
    """(winners, losers) indices: each group's argmax vs argmin (FlowGRPO ``"dpo"`` advantages).

    On ties ``argmax``/``argmin`` take the first; a group whose rewards are all equal gives the
    official fallback pair (its second sample wins over its first) unless ``drop_tied_groups``.
    """
    if rewards.ndim != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)")
    winners, losers = [], []
    for members in group_members(group_ids):
        if len(members) < 2:
            raise ValueError(f"DPO needs groups of at least 2 samples, got a group of {len(members)}")
        group_rewards = rewards[members]
        best, worst = int(torch.argmax(group_rewards)), int(torch.argmin(group_rewards))
        if best == worst:
            if drop_tied_groups:
                continue
            best, worst = 1, 0
        winners.append(int(members[best]))
        losers.append(int(members[worst]))
    return torch.tensor(winners, dtype=torch.long), torch.tensor(losers, dtype=torch.long)


def dpo_loss(err_theta_w: Tensor, err_theta_l: Tensor, err_ref_w: Tensor, err_ref_l: Tensor, *, beta: float) -> Tensor:
    """Diffusion-DPO (Wallace et al. Eq. 14; official ``inside_term = −0.5·β·Δ``). Scalar.

    ``Δ = (ℓ_θ(x_w) − ℓ_ref(x_w)) − (ℓ_θ(x_l) − ℓ_ref(x_l))`` per pair (all inputs (P,));
    ``L = mean(−log σ(−β/2·Δ))``. The reference errors are constants.
    """
    delta = (err_theta_w - err_ref_w.detach()) - (err_theta_l - err_ref_l.detach())
    return -F.logsigmoid(-0.5 * beta * delta).mean()


class OnlineDPO:
    """Online Flow-DPO on the common interface (see the module docstring)."""

    Config: ClassVar[type] = OnlineDPOConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_whole_groups=True, trains_on_subset=True, guidance_fields=("guidance_scale",), sampler_field="sampler"
    )

    def __init__(self, cfg: OnlineDPOConfig, policy: Policy, optim: Optimization) -> None:
        self.cfg, self.policy, self.optim = cfg, policy, optim
        self.sampler = make_collection_sampler(cfg.sampler, cfg.noise_level)
        self.schedule = flow_schedule(cfg.num_steps, cfg.shift)
        policy.update_old(0.0)  # reference = sampling policy = θ at the start

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        return collect_clean(self.policy, self.sampler, self.schedule, prompts, group_ids, generator,
                             guidance_scale=self.cfg.guidance_scale, weights="old")  # fmt: skip

    def _pair_errors(self, x0_w: Tensor, x0_l: Tensor, cond: Cond, generator: torch.Generator) -> tuple[Tensor, ...]:
        """FM errors of θ (with grad) and of the reference for one batch of pairs, same t and ε."""
        n = x0_w.shape[0]
        t = to_device(logit_normal_times(n, generator, self.cfg.shift), x0_w.device)
        noise = to_device(torch.randn(x0_w.shape, generator=generator), x0_w.device)
        x0 = torch.cat([x0_w, x0_l])
        noise2, t2 = torch.cat([noise, noise]), torch.cat([t, t])
        x_t, cond2 = noised(x0, noise2, t2), Cond.cat([cond, cond])
        err_theta = flow_matching_error(self.policy.velocity(x_t, t2, cond2), x0, noise2)
        with torch.no_grad(), self.policy.use_weights(self.cfg.reference):
            err_ref = flow_matching_error(self.policy.velocity(x_t, t2, cond2), x0, noise2)
        return err_theta[:n], err_theta[n:], err_ref[:n], err_ref[n:]

    def _pair_loss(self, rollout: Rollout, winners: Tensor, losers: Tensor, batch: MicroBatch) -> tuple[Tensor, dict]:
        """The DPO loss of one micro-batch of pairs at one fresh (t, ε) draw (a filler: local sample 0 twice)."""
        w, l_ = (batch.items, batch.items) if batch.filler else (winners[batch.items], losers[batch.items])
        errs = self._pair_errors(rollout.x0[w], rollout.x0[l_], rollout.cond[w], batch.generator)
        loss = dpo_loss(*errs, beta=self.cfg.beta)
        w_diff, l_diff = (errs[0] - errs[2]).detach(), (errs[1] - errs[3]).detach()
        return loss, {
            "loss": loss.detach(),
            "implicit_acc": ((w_diff - l_diff) < 0).float().mean(),
            "w_diff": w_diff.mean(),
            "l_diff": l_diff.mean(),
        }

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        cfg, device = self.cfg, rewards.device
        # The pairs depend on the rewards: chosen on the host, once per iteration, before the inner loop.
        rewards, group_ids = rewards.cpu(), rollout.all_group_ids.cpu()
        winners, losers = preference_pairs(rewards, group_ids, cfg.drop_tied_groups)
        logs: dict[str, float] = {"train/pairs": float(len(winners))}
        if len(winners) == 0:
            logs["train/skipped"] = 1.0  # every group tied and dropped: no preference, no step
            return logs
        logs["train/reward_margin"] = (rewards[winners] - rewards[losers]).mean().item()
        winners, losers = rollout.held(winners), rollout.held(losers)  # this process's pairs, local positions
        winners, losers = to_device(winners, device), to_device(losers, device)
        step_before = self.optim.global_step
        loss_fn = functools.partial(self._pair_loss, rollout, winners, losers)
        logs |= accumulate(self.optim, torch.arange(len(winners), device=device), loss_fn, generator=generator,
                           optimizer_steps=cfg.optimizer_steps_per_iteration, batch_size=cfg.train_batch_size,
                           repeats=max(1, int(cfg.num_steps * cfg.timestep_fraction)), pad=rollout.shared,
                           equal_passes=rollout.equal_passes)  # fmt: skip
        refreshed = crossed_multiple(step_before, self.optim.global_step, cfg.ref_update_step)
        if refreshed:
            self.policy.update_old(0.0)
        logs["train/reference_refreshed"] = float(refreshed)
        return logs
