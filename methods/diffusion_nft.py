"""DiffusionNFT: online diffusion RL on the forward process (Zheng et al., arXiv 2509.16117, ICLR 2026).

Collection samples clean images with the old policy θ_old and any solver (default: deterministic
DPM-Solver++(2M), 10 steps, no CFG), and stores only x0, the prompt condition and raw rewards.
Training noises x0 again and contrasts two implicit policies at the same x_t (Thm 3.2, Alg. 1):
``v⁺ = (1 − β)·v_old + β·v_θ`` and ``v⁻ = (1 + β)·v_old − β·v_θ``, weighted by the optimality
probability ``r = 0.5 + clip(A, ±A_max)/(2·A_max)`` (Alg. 1 lines 4–5).

Paper vs official code (NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``); both are supported
and the official code is the default:

* loss: the code's x0-space adaptive loss (``loss_space="x0"``, default; §3.3 "adaptive loss
  weighting") vs the paper's velocity-space Eq. 5 (``loss_space="v"``, no extra scale);
* the code scales the policy loss by ``A_max/β`` and adds ``kl_coef·mean((v_θ − v_ref)²)``
  with ``kl_coef = 1e-4`` (absent from the paper; set ``kl_coef=0`` for the paper's objective);
* training timesteps: the sampler's own schedule with one random step dropped per sample and
  fresh noise per (sample, step) (``timesteps="schedule"``, default); uniform or logit-normal t
  as options.

Two "positive-only" variants exist, and they differ:

* :data:`POSITIVE_BRANCH_ONLY` (``negative_branch=False``), the paper's ablation (§5, "removing the
  negative branch" makes rewards collapse almost instantly): drops the ``(1 − r)·L⁻`` term, leaving
  ``r·L⁺`` (a reward-weighted regression towards ``v⁺``);
* :data:`POSITIVE_ADVANTAGES_ONLY` (``adv_mode="positive_only"``), the official code's option: clamps the
  advantages at 0 before ``r`` (so ``r ∈ [0.5, 1]``) and keeps both branches. The official ``adv_mode``
  also has ``negative_only`` (clamp at 0 from above), ``one_only`` (A > 0 → 1, else 0) and ``binary``
  (sign A); the default ``"all"`` leaves A as it is.

The defaults (``negative_branch=True``, ``adv_mode="all"``) are the full objective, numerically unchanged.

After each collection's optimizer step(s) the sampling policy is soft-updated,
``θ_old ← η·θ_old + (1 − η)·θ`` (decay type 1: ``η = min(0.001·step, 0.5)``; type 2, the OCR
schedule; type 0: η = 0), and an EMA of θ is what evaluation uses (the harness's EMA).
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
from harness.policy import Policy, to_device, unconditional
from harness.rollout import rollout
from harness.samplers import SAMPLERS, flow_schedule, make_sampler, noised
from harness.types import Prompt
from harness.validation import check_at_least, check_fraction, check_literals, check_non_negative, check_positive
from methods.base import Capabilities, Rollout

AdvMode = Literal["all", "positive_only", "negative_only", "one_only", "binary"]
ADV_MODES: tuple[AdvMode, ...] = ("all", "positive_only", "negative_only", "one_only", "binary")


@dataclass(frozen=True, kw_only=True)
class DiffusionNFTConfig:
    """DiffusionNFT hyperparameters; defaults follow the official GenEval config (``config/nft.py``)."""

    beta: float = 1.0  # β, guidance strength of the implicit policies (0.1 for OCR / multi-reward)
    kl_coef: float = 1e-4  # λ_KL on mean((v_θ − v_ref)²); official ``train.beta``, not in the paper
    adv_clip_max: float = 5.0  # A_max
    std: StdMode = "global"  # one reward std over the batch (official) or per prompt group
    loss_space: Literal["x0", "v"] = "x0"  # official x0-space adaptive loss, or the paper's Eq. 5
    sampler: str = "dpm2"  # any solver: NFT needs only clean samples
    num_steps: int = 10  # collection steps
    shift: float = 1.0  # time shift of the sampling schedule (SD3.5 uses 3 inside its adapter)
    guidance_scale: float = 1.0  # CFG-free collection, as the paper
    timesteps: Literal["schedule", "uniform", "logit_normal"] = "schedule"
    timestep_fraction: float = 0.99  # keep int(N·fraction) of the N schedule steps per sample
    decay_type: Literal[0, 1, 2] = 1  # soft-update schedule of θ_old
    optimizer_steps_per_iteration: int = 1  # 2 for OCR in the official code
    train_batch_size: int = 64
    ema_interval: int = 1
    negative_branch: bool = True  # False: the paper's positive-only ablation, loss r·L⁺ only
    adv_mode: AdvMode = "all"  # official train.adv_mode: "positive_only" clamps A at 0 (both branches kept)

    def __post_init__(self) -> None:
        check_literals(self)
        check_positive(self, "beta", "adv_clip_max", "shift", "guidance_scale")
        check_non_negative(self, "kl_coef")
        check_at_least(self, 1, "num_steps", "optimizer_steps_per_iteration", "train_batch_size", "ema_interval")
        check_fraction(self, "timestep_fraction")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")

    @property
    def times_per_sample(self) -> int:
        """K: training times per sample and optimizer step, ``int(N·timestep_fraction)`` of the N steps (≥ 1)."""
        return max(1, int(self.num_steps * self.timestep_fraction))


POSITIVE_BRANCH_ONLY = DiffusionNFTConfig(negative_branch=False)  # the paper's ablation: no negative branch
POSITIVE_ADVANTAGES_ONLY = DiffusionNFTConfig(adv_mode="positive_only")  # the official code's: A clamped at 0


def mode_advantages(advantages: Tensor, adv_mode: AdvMode, adv_clip_max: float) -> Tensor:
    """The official ``adv_mode`` transform of the clipped advantages (``train_nft_sd3.py``), (B,).

    ``all``: A; ``positive_only``: clip(A, 0, A_max); ``negative_only``: clip(A, −A_max, 0);
    ``one_only``: 1 where A > 0, else 0; ``binary``: sign(A).
    """
    if adv_mode == "all":
        return advantages
    if adv_mode == "positive_only":
        return advantages.clamp(0.0, adv_clip_max)
    if adv_mode == "negative_only":
        return advantages.clamp(-adv_clip_max, 0.0)
    if adv_mode == "one_only":
        return (advantages > 0).to(advantages.dtype)
    if adv_mode == "binary":
        return torch.sign(advantages)
    raise ValueError(f"adv_mode must be one of {', '.join(ADV_MODES)}, got {adv_mode!r}")


def optimality_probability(
    rewards: Tensor, group_ids: Tensor, adv_clip_max: float = 5.0, std: StdMode = "global", adv_mode: AdvMode = "all"
) -> Tensor:
    """``r = 0.5 + clip(A, ±A_max)/(2·A_max)`` with A the per-prompt-centred reward over the std + 1e-4.

    DiffusionNFT Alg. 1 lines 4–5; the official code (``stat_tracking.py``, ``global_std=True``)
    centres per prompt and divides by one std over the whole batch, and applies ``adv_mode``
    (:func:`mode_advantages`) to the clipped A before r.
    """
    advantages = group_advantages(rewards, group_ids, std=std).clamp(-adv_clip_max, adv_clip_max)
    advantages = mode_advantages(advantages, adv_mode, adv_clip_max)
    return (0.5 + advantages / (2 * adv_clip_max)).clamp(0.0, 1.0)


def _mean_nonbatch(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    v_ref: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    r: Tensor,
    *,
    beta: float,
    kl_coef: float = 1e-4,
    adv_clip_max: float = 5.0,
    loss_space: Literal["x0", "v"] = "x0",
    negative_branch: bool = True,
) -> Tensor:
    """The NFT objective (DiffusionNFT Thm 3.2 / Eq. 5; official x0-space form by default). Scalar.

    With ``v⁺ = (1 − β)v_old + βv_θ`` and ``v⁻ = (1 + β)v_old − βv_θ``:

    * ``"x0"`` (official): ``x̂0^± = x_t − t·v^±``; each branch's mean squared error over
      non-batch dims is divided by ``sg(max(mean|x̂0^± − x0|, 1e-5))`` (float64), combined as
      ``(A_max/β)·[r·L⁺ + (1 − r)·L⁻]`` and averaged over the batch;
    * ``"v"`` (paper Eq. 5): ``r·‖v⁺ − v‖² + (1 − r)·‖v⁻ − v‖²`` (mean over dims), ``v = (x_t − x0)/t``.

    Both add ``kl_coef·mean((v_θ − v_ref)²)``. ``v_old`` and ``v_ref`` are treated as constants.
    ``negative_branch=False`` is the positive-only ablation: the ``(1 − r)`` term is dropped.
    """
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({x0.shape[0]},), got {tuple(t.shape)}")
    if loss_space not in ("x0", "v"):
        raise ValueError(f"loss_space must be 'x0' or 'v', got {loss_space!r}")
    v_old, v_ref = v_old.detach(), v_ref.detach()
    t_ = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    v_pos = (1 - beta) * v_old + beta * v_theta
    # Only the branches in use are computed: the positive-only ablation never builds v⁻ or L⁻.
    branches = [v_pos, (1 + beta) * v_old - beta * v_theta] if negative_branch else [v_pos]
    if loss_space == "x0":
        losses = []
        for v_branch in branches:
            error = (x_t - t_ * v_branch) - x0
            weight = _mean_nonbatch(error.double().abs()).clamp(min=1e-5).detach()
            losses.append(_mean_nonbatch(error**2) / weight.to(error.dtype))
        if negative_branch:
            policy_loss = (adv_clip_max / beta) * (r * losses[0] + (1 - r) * losses[1])
        else:
            policy_loss = (adv_clip_max / beta) * (r * losses[0])
    else:
        target = (x_t - x0) / t_
        policy_loss = r * _mean_nonbatch((v_pos - target) ** 2)
        if negative_branch:
            policy_loss = policy_loss + (1 - r) * _mean_nonbatch((branches[1] - target) ** 2)
    kl = ((v_theta - v_ref) ** 2).mean()
    return policy_loss.mean() + kl_coef * kl


def soft_update_eta(step: int, decay_type: int) -> float:
    """η of ``θ_old ← η·θ_old + (1 − η)·θ`` after ``step`` optimizer steps (official ``return_decay``)."""
    if decay_type == 0:
        return 0.0
    if decay_type == 1:
        return min(0.001 * step, 0.5)
    if decay_type == 2:
        return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)
    raise ValueError(f"decay_type must be 0, 1 or 2, got {decay_type}")


class DiffusionNFT:
    """DiffusionNFT on the common interface (see the module docstring)."""

    Config: ClassVar[type] = DiffusionNFTConfig
    capabilities: ClassVar[Capabilities] = Capabilities(guidance_fields=("guidance_scale",), sampler_field="sampler")

    def __init__(self, cfg: DiffusionNFTConfig, policy: Policy, optim: Optimization) -> None:
        self.cfg, self.policy, self.optim = cfg, policy, optim
        self.sampler = make_sampler(cfg.sampler)
        self.schedule = flow_schedule(cfg.num_steps, cfg.shift)
        policy.update_old(0.0)  # θ_old ← θ before the first collection

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        texts = [p.text for p in prompts]
        noise = torch.randn((len(texts), *self.policy.sample_shape), generator=generator)
        with self.policy.use_weights("old"):
            cond = self.policy.encode(texts)
            uncond = unconditional(self.policy, len(texts), self.cfg.guidance_scale)
            x0 = rollout(self.policy, self.sampler, cond, noise, self.schedule, guidance_scale=self.cfg.guidance_scale,
                         uncond=uncond, generator=generator).x0  # fmt: skip
        return Rollout(list(prompts), group_ids, cond, x0)

    def training_times(self, batch: int, generator: torch.Generator) -> Tensor:
        """(batch, K) training times per sample (official: the schedule minus one random step)."""
        cfg, keep = self.cfg, self.cfg.times_per_sample
        steps = self.schedule[:-1]  # the N sampling times, t = 1 … t_{N−1}; never t = 0
        if cfg.timesteps == "schedule":
            order = torch.stack([torch.randperm(len(steps), generator=generator)[:keep] for _ in range(batch)])
            return steps[order]
        if cfg.timesteps == "uniform":
            return torch.rand(batch, keep, generator=generator)
        return torch.sigmoid(torch.randn(batch, keep, generator=generator))

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        cfg = self.cfg
        r = rollout.mine(
            optimality_probability(rewards, rollout.all_group_ids, cfg.adv_clip_max, cfg.std, cfg.adv_mode)
        )
        logs: dict[str, float] = {"train/r_mean": r.mean().item()}
        # Each optimizer step's chunk draws its samples' K training times first (official order), then the passes.
        items = torch.arange(rollout.x0.shape[0], device=rollout.x0.device)
        logs |= accumulate(self.optim, items, functools.partial(self._loss, rollout, r),
                           generator=generator, optimizer_steps=cfg.optimizer_steps_per_iteration,
                           batch_size=cfg.train_batch_size, repeats=cfg.times_per_sample, pad=rollout.shared,
                           equal_passes=rollout.equal_passes,
                           on_chunk=lambda _, chunk, g: to_device(self.training_times(len(chunk), g), chunk.device))  # fmt: skip
        eta = soft_update_eta(self.optim.global_step, cfg.decay_type)
        self.policy.update_old(eta)
        logs["train/eta"] = eta
        return logs

    def _loss(self, rollout: Rollout, r: Tensor, batch: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The NFT loss of one micro-batch at its samples' ``batch.repeat``-th training time."""
        cfg, policy, sel = self.cfg, self.policy, batch.items
        times = to_device(self.training_times(1, batch.generator), sel.device) if batch.filler else batch.chunk_state
        x0, t = rollout.x0[sel], times[batch.positions, batch.repeat]
        x_t = noised(x0, to_device(torch.randn(x0.shape, generator=batch.generator), x0.device), t)
        cond = rollout.cond[sel]
        with torch.no_grad(), policy.use_weights("old"):
            v_old = policy.velocity(x_t, t, cond)
        v_theta = policy.velocity(x_t, t, cond)
        with torch.no_grad(), policy.use_weights("ref"):
            v_ref = policy.velocity(x_t, t, cond)
        loss = nft_loss(v_theta, v_old, v_ref, x0, x_t, t, r[sel], beta=cfg.beta, kl_coef=cfg.kl_coef,
                        adv_clip_max=cfg.adv_clip_max, loss_space=cfg.loss_space,
                        negative_branch=cfg.negative_branch)  # fmt: skip
        return loss, {"loss": loss.detach(), "kl": ((v_theta.detach() - v_ref) ** 2).mean()}
