"""DanceGRPO: GRPO on the Dance-SDE (Xue et al., arXiv 2505.07818; official code XueZeyue/DanceGRPO).

Rollouts integrate the rectified flow's reverse SDE with a constant noise η (the paper's SDE with
ε_t = η; :class:`harness.samplers.DanceSDE`, official ``flux_step(sde_solver=True)``):

    μ = x + v·dt − ½·η²·∇log p_t(x)·dt,   ∇log p_t(x) ≈ −(x − (1 − t)·x̂0)/t²,   x_next = μ + η·sqrt(−dt)·ε

and store every latent and each transition's log-prob (the Gaussian log-density averaged over
non-batch dims, in fp32). Training is GRPO's clipped surrogate on the per-step ratio (the paper's
GRPO objective; :func:`methods.flow_grpo.grpo_loss`) with group-relative advantages

    A_i = (r_i − mean_group) / (std_group + 1e-8)     (Bessel-corrected std, as ``torch.std``)

clipped to ±A_max, no KL term and no filter of tied groups (their A is 0). Each sample trains on a
random subset of its transitions (the paper's "timestep selection"): one permutation per sample of the
first T − 1 transitions, of which the first ``int((T − 1)·timestep_fraction)`` are trained. All
images of a prompt start from the same initial noise (``init_same_noise``, the paper's "noise
initialization"); the SDE noise differs. The decoded image is the last step's data prediction x̂0
(official ``latents = pred_original``): the last step is the Euler ODE step, whose result is x̂0,
and its transition is never trained (a :class:`harness.rollout.Window` over the first T − 1 steps).

Defaults are the official FLUX recipe (``scripts/finetune/finetune_flux_grpo.sh``, the closest the
official code ships to an SD3.5-M GenEval config: HPSv2.1 reward, 16 GPUs): 16 steps, shift 3,
η = 0.3, timestep_fraction 0.6, clip 1e-4, A_max = 5, 12 images per prompt, one prompt per GPU and
``gradient_accumulation_steps = 4`` (3 optimizer steps per iteration), lr 1e-5, grad-norm 1.0, no
true CFG (FLUX's guidance is distilled) and no EMA (``eval_ema_decay = 0``: evaluation uses θ; the
8-GPU script's ``--use_ema --ema_decay 0.995`` is a constant decay without the harness's warm-up).

Deviations: the official code feeds the model the time ``int(1000·σ)/1000``; here the policy adapter
receives σ itself (time conversions live in the adapters). The official code samples and trains one
image at a time; here ``train_batch_size`` is a memory knob (the shared loop weighs every sample
equally) and the shared loop shuffles samples across optimizer steps (the official code keeps them
in order). Several rewards are combined by the suite before the advantage (the official code has
one reward per run, or sums per-reward advantages in its multi-reward scripts).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from harness.accumulate import MicroBatch, accumulate
from harness.advantages import group_means
from harness.optim import Optimization
from harness.policy import Cond, Policy, policy_device, to_device
from harness.rollout import Trajectory, Window, replay_transition
from harness.samplers import DanceSDE, flow_schedule
from harness.types import Prompt
from harness.validation import check_at_least, check_fraction, check_non_negative, check_positive, check_unit_interval
from methods.base import Capabilities, Rollout, collect_trajectory
from methods.flow_grpo import grpo_logs, grpo_loss

__all__ = ["DanceGRPO", "DanceGRPOConfig", "dance_advantages", "initial_noise", "training_transitions"]


@dataclass(frozen=True, kw_only=True)
class DanceGRPOConfig:
    """DanceGRPO hyperparameters; defaults follow the official FLUX recipe (``finetune_flux_grpo.sh``)."""

    noise_level: float = 0.3  # η: the Dance-SDE's constant noise (the paper's ε_t)
    num_steps: int = 16  # sampling steps T
    shift: float = 3.0  # sd3_time_shift of the sampling schedule (official --shift 3)
    timestep_fraction: float = 0.6  # trained transitions per sample: int((T − 1)·fraction), a random subset
    clip_range: float = 1e-4  # ε of the clipped ratio
    adv_clip_max: float = 5.0  # A_max
    init_same_noise: bool = True  # one initial noise per prompt group
    guidance_scale: float = 1.0  # true CFG of the rollouts and the training log-prob (official FLUX: none)
    optimizer_steps_per_iteration: int = 3  # official: 12 samples per GPU, gradient_accumulation_steps 4
    train_batch_size: int = 64  # micro-batch size (official 1; a memory knob here)
    ema_interval: int = 1
    eval_ema_decay: float = 0.0  # official: no EMA, evaluation uses θ (0.995 constant in the 8-GPU script)

    def __post_init__(self) -> None:
        check_non_negative(self, "noise_level")
        check_positive(self, "shift", "clip_range", "adv_clip_max", "guidance_scale")
        check_at_least(self, 2, "num_steps")
        check_at_least(self, 1, "optimizer_steps_per_iteration", "train_batch_size", "ema_interval")
        check_fraction(self, "timestep_fraction")
        check_unit_interval(self, "eval_ema_decay")
        if int((self.num_steps - 1) * self.timestep_fraction) < 1:
            raise ValueError(
                f"timestep_fraction must leave int((num_steps − 1)·fraction) >= 1 trained transitions, got "
                f"{self.timestep_fraction} with num_steps={self.num_steps}"
            )

    @property
    def trained_transitions(self) -> int:
        """Transitions trained per sample, ``int((T − 1)·timestep_fraction)`` (official ``train_timesteps``)."""
        return int((self.num_steps - 1) * self.timestep_fraction)


def dance_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-8) -> Tensor:
    """``(r − mean_g)/(std_g + eps)`` per prompt group, std with Bessel's correction (official ``use_group``), (B,).

    A group of one image has no std (the official ``torch.std`` gives NaN): refused.
    """
    if rewards.ndim != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)")
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if bool((counts < 2).any()):
        raise ValueError(f"DanceGRPO needs >= 2 images per prompt for a group std, got group sizes {counts.tolist()}")
    centred = rewards.double() - group_means(rewards, group_ids)
    n = counts[inverse].double()
    std = (group_means(centred**2, group_ids) * n / (n - 1)).sqrt()
    return (centred / (std + eps)).float()


def initial_noise(
    group_ids: Tensor, sample_shape: Sequence[int], generator: torch.Generator, *, same_per_group: bool
) -> Tensor:
    """(B, *sample_shape) initial noise; ``same_per_group`` (official ``init_same_noise``): one draw per prompt
    group, in first-appearance order, repeated for its images."""
    if not same_per_group:
        return torch.randn((len(group_ids), *sample_shape), generator=generator)
    ids = group_ids.tolist()  # one read per collection
    slots = {g: i for i, g in enumerate(dict.fromkeys(ids))}
    per_group = torch.randn((len(slots), *sample_shape), generator=generator)
    return per_group[torch.tensor([slots[g] for g in ids], dtype=torch.long)]


def training_transitions(batch: int, transitions: int, keep: int, generator: torch.Generator) -> Tensor:
    """(batch, keep) transition indices: per sample the first ``keep`` of a random permutation (official ``perms``)."""
    if not 1 <= keep <= transitions:
        raise ValueError(f"keep must be in [1, {transitions}], got {keep}")
    return torch.stack([torch.randperm(transitions, generator=generator)[:keep] for _ in range(batch)])


class DanceGRPO:
    """DanceGRPO on the common interface (see the module docstring)."""

    Config: ClassVar[type] = DanceGRPOConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_log_prob=True, needs_whole_groups=True, guidance_fields=("guidance_scale",)
    )

    def __init__(self, cfg: DanceGRPOConfig, policy: Policy, optim: Optimization) -> None:
        self.cfg, self.policy, self.optim = cfg, policy, optim
        self.sampler = DanceSDE(cfg.noise_level)
        self.schedule = to_device(flow_schedule(cfg.num_steps, cfg.shift), policy_device(policy))

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        cfg = self.cfg
        noise = initial_noise(group_ids, self.policy.sample_shape, generator, same_per_group=cfg.init_same_noise)
        # The SDE on the first T − 1 steps; the last is Euler, whose result is the official image x̂0.
        return collect_trajectory(self.policy, self.sampler, prompts, group_ids, self.schedule, generator,
                                  guidance_scale=cfg.guidance_scale, noise=noise, window=Window(0, cfg.num_steps - 1))  # fmt: skip

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        cfg, trajectory = self.cfg, rollout.trajectory
        if trajectory is None or trajectory.latents is None or trajectory.log_probs is None:
            raise ValueError("DanceGRPO needs the trajectory with latents and log-probs from its own collect")
        advantages = dance_advantages(rewards, rollout.all_group_ids).clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
        advantages = rollout.mine(advantages)
        steps = training_transitions(len(advantages), trajectory.log_probs.shape[1], cfg.trained_transitions, generator)
        steps = to_device(steps, advantages.device)
        logs = {"train/advantage_abs_mean": advantages.abs().mean().item()}
        logs |= accumulate(self.optim, torch.arange(len(advantages), device=advantages.device),
                           functools.partial(self._loss, trajectory, rollout.cond, advantages, steps),
                           generator=generator, optimizer_steps=cfg.optimizer_steps_per_iteration,
                           batch_size=cfg.train_batch_size, repeats=cfg.trained_transitions, pad=rollout.shared,
                           equal_passes=rollout.equal_passes)  # fmt: skip
        return logs

    def _loss(
        self, trajectory: Trajectory, cond_all: Cond, advantages: Tensor, steps: Tensor, batch: MicroBatch
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """GRPO loss of one micro-batch, each sample at its ``batch.repeat``-th drawn transition."""
        cfg, sel = self.cfg, batch.items
        assert trajectory.latents is not None and trajectory.log_probs is not None
        j = steps[sel, batch.repeat]  # (b,) transition index per sample
        log_prob, _ = replay_transition(
            self.policy, self.sampler, trajectory, sel, j, cond_all[sel], cfg.guidance_scale
        )
        old_log_prob = trajectory.log_probs[sel, j]
        loss = grpo_loss(log_prob, old_log_prob, advantages[sel], clip_range=cfg.clip_range)
        return loss, grpo_logs(loss, log_prob, old_log_prob, None, kl_coef=0.0, clip_range=cfg.clip_range)
