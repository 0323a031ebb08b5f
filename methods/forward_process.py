"""Shared pieces of the forward-process baselines (RAFT, RWR, online DPO, AWM).

These methods store only clean samples x0 and train on them again through the forward process,
``x_t = (1 − t)·x0 + t·ε`` with the flow-matching target ``u = ε − x0`` (the notes' Part 2
notation: ``ℓ_θ = ‖v_θ(x_t, t, c) − u‖²``, a mean over non-batch dims as every official code
computes it). Nothing here is a method: the collection helper, the training-time draws, the
per-sample flow-matching error and :class:`RefreshedFlowMatching` (the collection-and-training
body RAFT and Flow-RWR share by composition) are the pieces every one of them needs, kept in one
place so that the baselines differ only where their papers differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from harness.accumulate import MicroBatch, accumulate
from harness.optim import Optimization
from harness.policy import Policy, WeightSet, to_device, unconditional
from harness.rollout import rollout
from harness.samplers import SAMPLERS, Sampler, flow_schedule, make_sampler, noised
from harness.types import Prompt
from harness.validation import check_at_least, check_fraction, check_non_negative, check_positive
from methods.base import Rollout


def flow_matching_error(v: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """``ℓ = mean_dims (v − (ε − x0))²`` per sample, (B,), in fp32 (the pretraining FM loss)."""
    error = v.float() - (noise.float() - x0.float())
    return (error**2).mean(dim=tuple(range(1, error.ndim)))


def weighted_flow_matching_loss(v: Tensor, x0: Tensor, noise: Tensor, weights: Tensor) -> Tensor:
    """``mean_i w_i·ℓ_i`` with ``ℓ`` the per-sample FM error; ``weights`` (B,) are constants. Scalar."""
    if weights.shape != (x0.shape[0],):
        raise ValueError(f"weights must have shape ({x0.shape[0]},), got {tuple(weights.shape)}")
    return (weights.detach().float() * flow_matching_error(v, x0, noise)).mean()


def logit_normal_times(n: int, generator: torch.Generator, shift: float = 1.0) -> Tensor:
    """(n,) training times ``t = s·u/(1 + (s − 1)·u)`` with ``u = sigmoid(N(0, 1))``.

    SD3's logit-normal density (``compute_density_for_timestep_sampling("logit_normal", 0, 1)``)
    that FlowGRPO's SFT/DPO baselines train with; the shift is the policy's schedule shift.
    """
    u = torch.sigmoid(torch.randn(n, generator=generator))
    return shift * u / (1 + (shift - 1) * u)


def check_sampler(name: str) -> None:
    """``name`` is a registered sampler (config validation)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")


def make_collection_sampler(name: str, noise_level: float) -> Sampler:
    """The sampler ``name``; ``noise_level`` reaches only stochastic samplers (deterministic ones take none)."""
    stochastic = name in SAMPLERS and SAMPLERS[name].stochastic
    return make_sampler(name, noise_level if stochastic else None)


def collect_clean(
    policy: Policy,
    sampler: Sampler,
    schedule: Tensor,
    prompts: Sequence[Prompt],
    group_ids: Tensor,
    generator: torch.Generator,
    *,
    guidance_scale: float,
    weights: WeightSet,
) -> Rollout:
    """Sample one clean x0 per prompt with ``weights`` and ``sampler`` through the shared rollout."""
    texts = [p.text for p in prompts]
    noise = torch.randn((len(texts), *policy.sample_shape), generator=generator)
    with policy.use_weights(weights):
        cond = policy.encode(texts)
        uncond = unconditional(policy, len(texts), guidance_scale)
        x0 = rollout(
            policy, sampler, cond, noise, schedule, guidance_scale=guidance_scale, uncond=uncond, generator=generator
        ).x0
    return Rollout(list(prompts), group_ids, cond, x0)


def crossed_multiple(step_before: int, step_after: int, interval: int) -> bool:
    """True when an optimizer step in ``(step_before, step_after]`` is a multiple of ``interval``."""
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    return step_after // interval > step_before // interval


def group_members(group_ids: Tensor) -> list[Tensor]:
    """Indices of each group's samples, in order of first appearance."""
    seen: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        seen.setdefault(int(g), []).append(i)
    return [torch.tensor(members, dtype=torch.long) for members in seen.values()]


def group_members_on(group_ids: Tensor, device: torch.device) -> list[Tensor]:
    """:func:`group_members` on ``device``: one read of ``group_ids`` and one copy there (the groups are views)."""
    members = group_members(group_ids)
    return list(to_device(torch.cat(members), device).split([len(m) for m in members]))


def train_weighted_flow_matching(
    policy: Policy,
    optim: Optimization,
    rollout_: Rollout,
    indices: Tensor,
    weights: Tensor,
    *,
    draws_per_sample: int,
    train_batch_size: int,
    optimizer_steps: int,
    shift: float,
    generator: torch.Generator,
    mean_over: int | None = None,
) -> dict[str, float]:
    """Minimise ``mean_i w_i·ℓ_θ(x_t^i)`` over the samples ``indices`` (weights aligned with them).

    Each sample is trained at ``draws_per_sample`` fresh (t, ε) draws, t logit-normal, all accumulated
    into ``optimizer_steps`` steps through the shared loop (:func:`harness.accumulate.accumulate`), as
    FlowGRPO's SFT/DPO scripts accumulate over samples and their timestep draws. Returns the weighted loss
    and the unweighted FM error averaged over (sample, draw), and the grad norm.

    ``mean_over = N``: each optimizer step's loss is the mean over its share of N samples, ``N/steps``, of
    which only ``indices`` carry weight (FlowGRPO's SFT: ``mean(adv·ℓ)`` over every sample, adv ∈ {0, 1});
    the zero-weight samples add nothing to the loss or its gradient, so they are not run (a ``len(chunk)·
    steps/N`` factor on each step's mean instead). None: the mean over the trained ``indices``.
    """
    if weights.shape != indices.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must align with indices {tuple(indices.shape)}")
    if mean_over is not None and mean_over < len(indices):
        raise ValueError(f"mean_over must be at least the {len(indices)} trained samples, got {mean_over}")

    def chunk_factor(_: int, chunk: Tensor, __: torch.Generator) -> float:
        return 1.0 if mean_over is None else len(chunk) * optimizer_steps / mean_over

    def loss_fn(batch: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]:
        sel = batch.items if batch.filler else indices[batch.items]  # a filler computes on local sample 0
        x0 = rollout_.x0[sel]
        t = to_device(logit_normal_times(len(sel), batch.generator, shift), x0.device)
        noise = to_device(torch.randn(x0.shape, generator=batch.generator), x0.device)
        v_theta = policy.velocity(noised(x0, noise, t), t, rollout_.cond[sel])
        w = torch.zeros(1, device=x0.device) if batch.filler else weights[batch.items] * batch.chunk_state
        loss = weighted_flow_matching_loss(v_theta, x0, noise, w)
        return loss, {"loss": loss.detach(), "fm_error": flow_matching_error(v_theta.detach(), x0, noise).mean()}

    return accumulate(optim, torch.arange(len(indices), device=indices.device), loss_fn, generator=generator, optimizer_steps=optimizer_steps,
                      batch_size=train_batch_size, repeats=draws_per_sample, pad=rollout_.shared,
                      equal_passes=rollout_.equal_passes, on_chunk=chunk_factor)  # fmt: skip


class FlowMatchingSettings(Protocol):
    """The config fields :class:`RefreshedFlowMatching` reads (RAFTConfig and RWRConfig both have them)."""

    @property
    def sampler(self) -> str: ...
    @property
    def noise_level(self) -> float: ...
    @property
    def num_steps(self) -> int: ...
    @property
    def shift(self) -> float: ...
    @property
    def guidance_scale(self) -> float: ...
    @property
    def timestep_fraction(self) -> float: ...
    @property
    def sample_refresh_interval(self) -> int: ...
    @property
    def optimizer_steps_per_iteration(self) -> int: ...
    @property
    def train_batch_size(self) -> int: ...


def check_flow_matching_settings(cfg: FlowMatchingSettings) -> None:
    """The value checks RAFT's and Flow-RWR's configs share (their ``__post_init__``)."""
    check_sampler(cfg.sampler)
    check_non_negative(cfg, "noise_level")
    check_positive(cfg, "shift", "guidance_scale")
    check_at_least(cfg, 1, "num_steps", "sample_refresh_interval", "optimizer_steps_per_iteration", "train_batch_size")
    check_fraction(cfg, "timestep_fraction")


class RefreshedFlowMatching:
    """The body RAFT and Flow-RWR share (held by composition, not inherited): collect clean samples
    with the sampling policy ("old"), train weighted flow matching on some of them, and copy θ into
    the sampling policy every ``sample_refresh_interval`` optimizer steps (FlowGRPO's "online"
    refresh; 1 samples with the latest θ at every collection). The methods differ only in which
    samples they train on and with which weights.
    """

    def __init__(self, cfg: FlowMatchingSettings, policy: Policy, optim: Optimization) -> None:
        self.cfg, self.policy, self.optim = cfg, policy, optim
        self.sampler = make_collection_sampler(cfg.sampler, cfg.noise_level)
        self.schedule = flow_schedule(cfg.num_steps, cfg.shift)
        policy.update_old(0.0)  # the sampling policy starts as θ

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        return collect_clean(self.policy, self.sampler, self.schedule, prompts, group_ids, generator,
                             guidance_scale=self.cfg.guidance_scale, weights="old")  # fmt: skip

    def train(
        self,
        rollout: Rollout,
        indices: Tensor,
        weights: Tensor,
        generator: torch.Generator,
        mean_over: int | None = None,
    ) -> dict[str, float]:
        """:func:`train_weighted_flow_matching` on ``indices`` (``mean_over``: its normaliser), then the refresh;
        logs ``train/sampler_refreshed``."""
        cfg = self.cfg
        step_before = self.optim.global_step
        logs = train_weighted_flow_matching(
            self.policy, self.optim, rollout, indices, weights,
            draws_per_sample=max(1, int(cfg.num_steps * cfg.timestep_fraction)), train_batch_size=cfg.train_batch_size,
            optimizer_steps=cfg.optimizer_steps_per_iteration, shift=cfg.shift, generator=generator,
            mean_over=mean_over,
        )  # fmt: skip
        refreshed = crossed_multiple(step_before, self.optim.global_step, cfg.sample_refresh_interval)
        if refreshed:
            self.policy.update_old(0.0)
        logs["train/sampler_refreshed"] = float(refreshed)
        return logs
