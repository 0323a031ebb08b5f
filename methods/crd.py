"""CRD: Centered Reward Distillation (Zhu, Wang, Lathuilière & Kalogeiton, arXiv 2603.14128).

The paper's own code is not public. Its first author ported it to X-GenGroup/Flow-Factory
(``src/flow_factory/trainers/crd.py``, ``examples/crd/lora/sd3_5/default.yaml``, PR #121, "matching the original
CRD implementation"); that port is the official code here, and the paper's body was not available to this
implementation beyond its abstract.

KL-regularised reward maximisation has the optimum ``p*(x|c) ∝ p_ref(x|c)·exp(r(x, c)/β)``, so
``r = β·log(p*/p_ref) + β·log Z(c)``: centring within a prompt cancels the intractable ``Z(c)``. CRD regresses the
model's centred implicit reward on the centred external reward, on clean samples noised again (forward process).
With ``u = ε − x0`` and ``e(v) = (v − u)²/w(v)`` (``w(v) = sg(max(mean|v − u|, 1e-5))``, ``adaptive_weighting``; 1
without it), the implicit reward of θ against an old model and the normalised reward are

    r_θ = −mean_dims(e(v_θ) − e(v_old)),      a = 0.5 + clip(A, ±A_max)/(2·A_max)

and with uniform weights over a centring set S (τ < 0, the default), ``R_c = a − mean_S a`` and
``R_θc = r_θ − sg(mean_S r_θ)``:

    L = (A_max/β)·mean (β·R_θc − R_c)²    (``loss_type="bce"``: BCE-with-logits of β·R_θc against σ(R_c))

τ ≥ 0 averages two centrings weighted by ``softmax(±a/τ)`` (τ = 0: the samples with a > 0, resp. a < 0). The KL
to the CFG-guided base, ``mean_dims(v_θ − v_ref^{cfg})²``, is weighted per sample by
``kl_floor + a·(kl_coef − kl_floor)`` (reward-adaptive KL) or by ``kl_coef``.

Three weight sets beyond the base: θ; "old" for r_θ, blended after each collection's update with decay
``min(0.25 + 0.005·step, 0.999)``; and a separate sampling model θ_s (paper: decoupling the sampler from the moving
reference), blended with ``0`` before step 75, then ``min(0.0075·(step − 75), 0.999)``. The Policy protocol has one
"old" weight set, so θ_s is kept here as a copy of θ's trainable tensors and swapped in for collection only.

Official settings kept (the SD3.5-M OCR recipe, paper Table 3; no GenEval recipe is shipped): CFG-free Euler ODE
rollouts at 10 steps, β = 1, MSE, τ = −1, adaptive weighting, kl_coef = 0.1 with kl_cfg 4.5 and reward-adaptive KL,
A_max = 5 with one global reward std, 20 training times per sample stratified over the schedule steps
(``time_sampling_strategy="discrete"``, top 99%, t = 1 included) and shared by a micro-batch, fresh ε per sample and
time. Deviations are marked ``# deviation:``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.accumulate import MicroBatch, accumulate
from harness.advantages import StdMode
from harness.fsdp import full_tensors, local_like
from harness.optim import Optimization
from harness.policy import Policy, guided_velocity, iter_batches, to_device, unconditional
from harness.samplers import flow_schedule, noised
from harness.types import Prompt
from harness.validation import (
    check_at_least,
    check_fraction,
    check_literals,
    check_non_negative,
    check_positive,
    require,
)
from methods.base import Capabilities, Rollout
from methods.diffusion_nft import optimality_probability
from methods.forward_process import (
    check_sampler,
    collect_clean,
    group_members,
    group_members_on,
    make_collection_sampler,
)

__all__ = ["CRD", "CRDConfig", "crd_loss", "crd_loss_of_spans", "decay_at", "implicit_reward", "reward_adaptive_kl"]

Decay = tuple[int, float, float, float]  # (start step, start value, slope, end value)


@dataclass(frozen=True, kw_only=True)
class CRDConfig:
    """CRD hyperparameters; defaults follow the author's Flow-Factory port and its SD3.5 OCR recipe."""

    beta: float = 1.0  # β of the matched implicit reward (official crd_beta)
    loss_type: Literal["mse", "bce"] = "mse"
    implicit_reference: Literal["old", "ref"] = "old"  # r_θ against "old" (official use_old_for_loss) or the base
    adaptive_weighting: bool = True  # w(v) on the error terms of r_θ (official adaptive_logp)
    weight_temp: float = -1.0  # τ: < 0 uniform centring; 0 hard split; > 0 softmax(±a/τ), two directions
    centering: Literal["group", "micro_batch"] = "group"  # the centring set S (see the class docstring)
    old_decay: Decay = (0, 0.25, 0.005, 0.999)  # "old" blend decay (official old_model_decay)
    sampler_decay: Decay = (75, 0.0, 0.0075, 0.999)  # θ_s blend decay (official sampling_model_decay)
    kl_coef: float = 0.1  # λ_KL (official kl_beta)
    kl_cfg: float = 4.5  # CFG scale of the KL anchor (the base model); 1: none
    reward_adaptive_kl: bool = True
    kl_floor: float = 1e-4  # the reward-adaptive KL weight at a = 0 (official base_beta)
    adv_clip_max: float = 5.0  # A_max
    std: StdMode = "global"  # official global_std = True
    sampler: str = "euler"  # official: the SD3.5 adapter's ODE (FlowMatch Euler)
    noise_level: float = 0.7  # a stochastic sampler's noise (ignored by the ODE solvers)
    num_steps: int = 10  # collection steps
    shift: float = 1.0  # schedule time shift; SD3.5 suites set 3.0 (official scheduler shift 3, docs/sd3.md)
    guidance_scale: float = 1.0  # CFG of the collection (official: CFG-free)
    train_timesteps: int = 20  # K: training times per micro-batch (official example; its default is int(N·0.99))
    timestep_fraction: float = 0.99  # the times lie in the top fraction of the denoising axis (timestep_range)
    optimizer_steps_per_iteration: int = 2  # official gradient_step_per_epoch
    train_batch_size: int = 1  # prompt groups per micro-batch
    ema_interval: int = 1

    def __post_init__(self) -> None:
        check_literals(self)
        check_sampler(self.sampler)
        check_positive(self, "beta", "kl_cfg", "adv_clip_max", "shift", "guidance_scale")
        check_non_negative(self, "kl_coef", "kl_floor", "noise_level")
        check_fraction(self, "timestep_fraction")
        check_at_least(self, 1, "num_steps", "train_timesteps", "optimizer_steps_per_iteration", "train_batch_size",
                       "ema_interval")  # fmt: skip
        require(self.weight_temp == self.weight_temp and abs(self.weight_temp) != float("inf"), "weight_temp",
                self.weight_temp, "a finite number (< 0: uniform centring)")  # fmt: skip
        require(self.kl_cfg >= 1, "kl_cfg", self.kl_cfg, ">= 1 (1: no CFG on the KL anchor)")
        for name in ("old_decay", "sampler_decay"):
            start, value, slope, end = getattr(self, name)
            ok = start >= 0 and 0 <= value <= 1 and 0 <= end <= 1 and slope >= 0 and slope == slope
            require(ok, name, getattr(self, name), "(start step ≥ 0, start value in [0, 1], slope ≥ 0, end in [0, 1])")


def decay_at(step: int, decay: Decay) -> float:
    """The blend decay after ``step`` optimizer steps: ``start value`` before ``start step``, then rising by
    ``slope`` per step up to ``end value`` (official ``compute_decay``)."""
    start, value, slope, end = decay
    return value if step < start else min(value + (step - start) * slope, end)


def _mean_nonbatch(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def implicit_reward(v_theta: Tensor, v_old: Tensor, x0: Tensor, noise: Tensor, *, adaptive: bool = True) -> Tensor:
    """``r_θ = −mean_dims((v_θ − u)²/w_θ − (v_old − u)²/w_old)``, (B,), ``u = ε − x0`` (official CRD step 4).

    With ``adaptive`` each term is divided by ``w = sg(max(mean_dims|v − u|, 1e-5))`` (computed in float64);
    otherwise ``w = 1``. ``v_old`` is a constant.
    """
    target = noise.float() - x0.float()
    terms = []
    for v in (v_theta.float(), v_old.detach().float()):
        error = (v - target) ** 2
        if adaptive:
            weight = _mean_nonbatch((v.detach().double() - target.double()).abs()).clamp(min=1e-5)
            error = error / weight.to(error.dtype).reshape(-1, *([1] * (error.ndim - 1)))
        terms.append(error)
    return -_mean_nonbatch(terms[0] - terms[1])


def _centred_terms(r_theta: Tensor, a: Tensor, p: Tensor, *, beta: float, loss_type: str) -> Tensor:
    """Per-sample matching terms of one centring with weights ``p`` over the set, (n,)."""
    reward_c = a - (a * p).sum()
    implicit_c = r_theta - (r_theta * p).sum().detach()
    if loss_type == "bce":
        return F.binary_cross_entropy_with_logits(beta * implicit_c, torch.sigmoid(reward_c), reduction="none")
    return (beta * implicit_c - reward_c) ** 2


def _direction_weights(a: Tensor, weight_temp: float, sign: float) -> Tensor:
    """``softmax(sign·a/τ)``; with τ = 0, the softmax of a over the samples with ``sign·a > 0`` (uniform if none).

    As in the official code the hard split acts on the normalised a ∈ [0, 1], so only a = 0 leaves the positive
    side and the negative side is always empty (uniform).
    """
    if weight_temp > 0:
        return torch.softmax(sign * a / weight_temp, dim=0)
    side = sign * a > 0  # chosen on the device: an empty side's softmax (NaN) is discarded, never read back
    return torch.where(side.any(), torch.softmax(a.masked_fill(~side, float("-inf")), dim=0), 1.0 / len(a))


def crd_loss(
    r_theta: Tensor,
    a: Tensor,
    group_index: Tensor | None = None,
    *,
    beta: float,
    loss_type: Literal["mse", "bce"] = "mse",
    weight_temp: float = -1.0,
) -> Tensor:
    """The centred reward-matching loss (official ``_compute_crd_loss``), unscaled. Scalar.

    ``r_θ`` (B,) implicit rewards, ``a`` (B,) normalised rewards in [0, 1]. Each centring set (a group of
    ``group_index``, or the whole batch when None) is centred on its own means; the per-sample terms are averaged
    over the batch. ``weight_temp < 0`` centres on the uniform mean; otherwise the two directions
    ``softmax(±a/τ)`` are averaged (0.5 each).
    """
    if r_theta.shape != a.shape or r_theta.ndim != 1:
        raise ValueError(f"r_theta {tuple(r_theta.shape)} and a {tuple(a.shape)} must both be (B,)")
    sets = [torch.arange(len(a), device=a.device)] if group_index is None else group_members(group_index)
    terms = torch.zeros_like(r_theta)
    for host_members in sets:
        members = to_device(host_members, a.device)
        term = _set_terms(r_theta[members], a[members], beta=beta, loss_type=loss_type, weight_temp=weight_temp)
        terms = terms.index_put((members,), term)
    return terms.mean()


def crd_loss_of_spans(
    r_theta: Tensor, a: Tensor, spans: Sequence[slice], *, beta: float, loss_type: Literal["mse", "bce"],
    weight_temp: float,
) -> Tensor:  # fmt: skip
    """:func:`crd_loss` whose centring sets are consecutive ``spans`` covering the batch in order (a micro-batch
    of whole groups): the same value, from slices, so that no group index is built or read back."""
    terms = [_set_terms(r_theta[s], a[s], beta=beta, loss_type=loss_type, weight_temp=weight_temp) for s in spans]
    return torch.cat(terms).mean()


def _set_terms(r: Tensor, a_s: Tensor, *, beta: float, loss_type: str, weight_temp: float) -> Tensor:
    """The per-sample terms of one centring set (see :func:`crd_loss`), (n,)."""
    if weight_temp < 0:
        return _centred_terms(r, a_s, torch.full_like(a_s, 1.0 / len(a_s)), beta=beta, loss_type=loss_type)
    up, down = (_direction_weights(a_s, weight_temp, sign) for sign in (1.0, -1.0))
    return 0.5 * _centred_terms(r, a_s, up, beta=beta, loss_type=loss_type) + 0.5 * _centred_terms(
        r, a_s, down, beta=beta, loss_type=loss_type
    )


def reward_adaptive_kl(kl: Tensor, a: Tensor, *, kl_coef: float, kl_floor: float = 1e-4) -> Tensor:
    """``mean_i (kl_floor + a_i·(kl_coef − kl_floor))·kl_i``: the KL weight rises from ``kl_floor`` (a = 0) to
    ``kl_coef`` (a = 1) (official ``reward_adaptive_kl``, ``base_beta = 1e-4``). Scalar; inputs (B,)."""
    floor = kl_floor / max(kl_coef, 1e-8)
    return kl_coef * ((floor + a * (1 - floor)) * kl).mean()


class ParameterSnapshot:
    """A copy of θ's trainable tensors, blended towards θ and swapped into θ's tensors while sampling.

    deviation: CRD needs a fourth weight set (its sampling model θ_s) and the Policy protocol has three; θ_s is
    held here and swapped in during collection only, where no autograd graph holds θ's tensors.
    """

    def __init__(self, parameters: list[nn.Parameter]) -> None:
        self.parameters = parameters
        self.tensors = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def blend(self, decay: float) -> None:
        """``θ_s ← decay·θ_s + (1 − decay)·θ`` (decay 0 copies θ, 1 keeps θ_s)."""
        for copy, parameter in zip(self.tensors, self.parameters, strict=True):
            copy.mul_(decay).add_(parameter.detach(), alpha=1.0 - decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """θ's tensors hold θ_s inside the block and θ again after it."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.parameters]
            for parameter, copy in zip(self.parameters, self.tensors, strict=True):
                parameter.copy_(copy)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, copy in zip(self.parameters, saved, strict=True):
                    parameter.copy_(copy)

    def state_dict(self) -> dict[str, list[Tensor]]:
        return {"tensors": full_tensors(list(self.tensors))}  # full tensors under FSDP, as checkpoints hold

    def load_state_dict(self, state: dict[str, list[Tensor]]) -> None:
        self.tensors = [local_like(t, like).clone() for t, like in zip(state["tensors"], self.tensors, strict=True)]


class CRD:
    """CRD on the common interface (see the module docstring).

    A micro-batch is ``train_batch_size`` whole prompt groups: with ``centering="group"`` (the paper's
    within-prompt centring) each group is centred on its own means, which needs every member's r_θ at the same
    t. # deviation: the port centres over its gathered micro-batch (8 samples on each of 8 GPUs, each GPU's from
    another prompt under its group-contiguous sampler), which mixes prompts; ``centering="micro_batch"``
    centres over all samples of the micro-batch's groups instead, the nearest harness equivalent.
    """

    Config: ClassVar[type] = CRDConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_whole_groups=True, guidance_fields=("kl_cfg", "guidance_scale"), sampler_field="sampler"
    )

    def __init__(self, cfg: CRDConfig, policy: Policy, optim: Optimization) -> None:
        self.cfg, self.policy, self.optim = cfg, policy, optim
        self.sampler = make_collection_sampler(cfg.sampler, cfg.noise_level)
        self.schedule = flow_schedule(cfg.num_steps, cfg.shift)
        valid = (self.schedule[:-1] >= 1 - cfg.timestep_fraction - 1e-6).nonzero().flatten()
        self._time_range = int(valid.min()), int(valid.max())  # the schedule indices training times are drawn from
        policy.update_old(0.0)  # "old" starts as θ
        self.sampling_model = ParameterSnapshot(policy.trainable_parameters())  # θ_s starts as θ

    def state_dict(self) -> dict[str, object]:
        return {"sampling_model": self.sampling_model.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.sampling_model.load_state_dict(state["sampling_model"])  # type: ignore[arg-type]

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        with self.sampling_model.swapped_in():
            return collect_clean(self.policy, self.sampler, self.schedule, prompts, group_ids, generator,
                                 guidance_scale=self.cfg.guidance_scale, weights="train")  # fmt: skip

    def training_times(self, generator: torch.Generator) -> Tensor:
        """(K,) times, stratified over the schedule steps with t ≥ 1 − fraction, t = 1 included (official
        ``TimeSampler.discrete``: ``linspace`` strata truncated to integers, so the last step is never drawn)."""
        cfg, steps = self.cfg, self.schedule[:-1]
        bounds = torch.linspace(*self._time_range, cfg.train_timesteps + 1)
        lower, upper = bounds[:-1].long(), bounds[1:].long()
        index = lower + (torch.rand(cfg.train_timesteps, generator=generator) * (upper - lower)).long()
        return steps[index]

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        cfg = self.cfg
        a = rollout.mine(optimality_probability(rewards, rollout.all_group_ids, cfg.adv_clip_max, cfg.std))
        groups = group_members_on(rollout.group_ids, a.device)  # this process's whole groups
        # The items index the host list of groups (on the CPU); each chunk's are read once, with its times.
        logs = accumulate(self.optim, torch.arange(len(groups)), functools.partial(self._loss, rollout, a, groups),
                          generator=generator, optimizer_steps=cfg.optimizer_steps_per_iteration,
                          batch_size=cfg.train_batch_size, repeats=cfg.train_timesteps, pad=rollout.shared,
                          equal_passes=rollout.equal_passes,
                          on_chunk=lambda _, chunk, g: (chunk.tolist(), [to_device(self.training_times(g), a.device)
                                                        for _ in iter_batches(len(chunk), cfg.train_batch_size)]))  # fmt: skip
        step = self.optim.global_step
        old_decay, sampler_decay = decay_at(step, cfg.old_decay), decay_at(step, cfg.sampler_decay)
        self.policy.update_old(old_decay)
        self.sampling_model.blend(sampler_decay)
        return logs | {"train/a_mean": a.mean().item(), "train/old_decay": old_decay,
                       "train/sampler_decay": sampler_decay}  # fmt: skip

    def _velocities(self, x_t: Tensor, t: Tensor, rollout: Rollout, sel: Tensor) -> dict[str, Tensor]:
        """v_θ (with grad), the implicit reward's reference and the CFG-guided KL anchor (without)."""
        cfg, policy, cond = self.cfg, self.policy, rollout.cond[sel]
        out = {"theta": policy.velocity(x_t, t, cond)}
        with torch.no_grad():
            with policy.use_weights(cfg.implicit_reference):
                out["old"] = policy.velocity(x_t, t, cond)
            if cfg.kl_coef > 0:
                with policy.use_weights("ref"):
                    uncond = unconditional(policy, len(sel), cfg.kl_cfg)
                    out["ref"] = guided_velocity(policy, x_t, t, cond, uncond, cfg.kl_cfg)
        return out

    def _loss(
        self, rollout: Rollout, a_all: Tensor, groups: list[Tensor], batch: MicroBatch
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """CRD's loss of one micro-batch of whole groups at its ``batch.repeat``-th training time."""
        cfg, (items, times_per_batch) = self.cfg, batch.chunk_state
        members = [groups[g] for g in ([0] if batch.filler else items[batch.positions])]  # a filler: local group 0
        sel = torch.cat(members)
        ends = list(itertools.accumulate(len(m) for m in members))
        spans = [slice(end - len(m), end) for m, end in zip(members, ends, strict=True)]  # each group's rows of sel
        if batch.filler:
            times = to_device(self.training_times(batch.generator), sel.device)
        else:
            times = times_per_batch[batch.index]
        x0, t = rollout.x0[sel], times[batch.repeat].expand(len(sel))
        noise = to_device(torch.randn(x0.shape, generator=batch.generator), x0.device).to(x0.dtype)
        v = self._velocities(noised(x0, noise, t), t, rollout, sel)
        r_theta = implicit_reward(v["theta"], v["old"], x0, noise, adaptive=cfg.adaptive_weighting)
        a = a_all[sel]
        centred = crd_loss_of_spans(r_theta, a, spans if cfg.centering == "group" else [slice(0, len(sel))],
                                    beta=cfg.beta, loss_type=cfg.loss_type, weight_temp=cfg.weight_temp)  # fmt: skip
        policy_loss = centred * cfg.adv_clip_max / cfg.beta
        kl = _mean_nonbatch((v["theta"] - v["ref"]) ** 2) if cfg.kl_coef > 0 else torch.zeros_like(a)
        if cfg.reward_adaptive_kl:
            kl_loss = reward_adaptive_kl(kl, a, kl_coef=cfg.kl_coef, kl_floor=cfg.kl_floor)
        else:
            kl_loss = cfg.kl_coef * kl.mean()
        loss = policy_loss + kl_loss
        return loss, {"loss": loss.detach(), "policy_loss": policy_loss.detach(), "kl": kl.detach().mean(),
                      "kl_loss": kl_loss.detach(), "r_theta_mean": r_theta.detach().mean()}  # fmt: skip
