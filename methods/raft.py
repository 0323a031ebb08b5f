"""RAFT: reward-ranked fine-tuning, online rejection sampling (Dong et al., arXiv 2304.06767, 2023).

Per prompt, sample a group of K images, keep the best (top-k) by reward, and fine-tune on them
with the model's own pretraining loss; repeat with the updated model (RAFT Alg. 1: "data
collection → data ranking → model fine-tuning"). For a flow model the fine-tuning loss is plain
conditional flow matching on the kept clean samples:

    L(θ) = E_{x0 ∈ top-k(c), t, ε} ‖v_θ(x_t, t, c) − (ε − x0)‖²,   x_t = (1 − t)·x0 + t·ε

This is also FlowGRPO's "SFT / OnlineSFT" baseline (the notes' Part 2; ``train_sd3_sft.py`` with
``stat_tracking.py`` type ``"sft"``). Like DiffusionNFT it needs only clean samples, so any
solver collects them. Collection and training are :class:`methods.forward_process.RefreshedFlowMatching`,
shared with :mod:`methods.rwr`.

Ties (``ties``): which source does what.

* ``"all_tied"`` (default): FlowGRPO's official OnlineSFT code. Its ``"sft"`` advantage is
  ``rewards == max(group rewards)``, so *every* sample equal to the group maximum is kept, and a
  group whose rewards are all equal (common with GenEval's discrete partial credit) trains on all
  of its samples. For ``top_k > 1`` we keep every sample at least as good as the k-th best (the
  same rule; FlowGRPO itself only has k = 1).
* ``"exact_k"``: RAFT's paper (Alg. 1 ranks the K samples and keeps exactly k); ties are broken
  by a stable sort, the first in group order wins.

The default is the official code's rule, by the project rule (paper and official code differ:
support both, default to the official code); FlowGRPO's is the only official diffusion
implementation of this baseline, and the one the notes' comparisons were run with.

Loss normaliser (``loss_mean``). The official loss is ``mean(adv·ℓ)`` over *all* samples with
``adv ∈ {0, 1}`` (``train_sd3_sft.py``), so each step's gradient is ``kept/B`` times the mean over
the kept samples: ``"all_samples"`` (default). ``"kept"`` averages over the kept samples only (the
earlier harness rule, the paper's SFT on the chosen set; about B/kept times larger a gradient, which
matters under gradient clipping at 1.0). The zero-weight samples are not run: they add nothing to
the loss or its gradient. That is a deviation in compute only: the official code spends a forward
and a backward pass on each, B/kept times our training passes per iteration.

Sampling setup. The notes' FlowGRPO baselines (SFT, Flow-RWR, Flow-DPO) share one online setup:
Flow-SDE (a = 0.7), CFG 4.5, 40 steps, the collector refreshed every 40 optimizer steps. That is
the :data:`ONLINE_SFT` preset. The config's default deliberately deviates (see the ``# deviation:``
comments): a CFG-free deterministic DPM-Solver++(2M) collection at 10 steps, as DiffusionNFT's,
refreshed at every step (RAFT's own loop samples with the latest model each round). CFG-free
forward-process baselines cost half the sampling compute per image on the shapes CPU benchmark
and share DiffusionNFT's collector, so the forward-process methods differ only in their losses.
Training times are as the official scripts in both: logit-normal t with
``int(num_steps·timestep_fraction)`` fresh (t, ε) draws per kept sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from harness.optim import Optimization
from harness.policy import Policy, to_device
from harness.types import Prompt
from harness.validation import check_at_least, check_literals
from methods.base import Capabilities, Rollout
from methods.forward_process import RefreshedFlowMatching, check_flow_matching_settings, group_members

Ties = Literal["all_tied", "exact_k"]
LossMean = Literal["all_samples", "kept"]


@dataclass(frozen=True, kw_only=True)
class RAFTConfig:
    """RAFT hyperparameters; the selection is official (FlowGRPO OnlineSFT), the collection CFG-free (see above)."""

    top_k: int = 1  # k of RAFT's "top-k of K" per prompt (top-1: FlowGRPO's OnlineSFT)
    ties: Ties = "all_tied"  # "all_tied": official FlowGRPO "sft" (all equal to the max); "exact_k": RAFT paper
    loss_mean: LossMean = "all_samples"  # official: mean(adv·ℓ) over every sample; "kept": over the kept ones
    sampler: str = "dpm2"  # deviation: official flow_sde; any solver works, only clean samples are stored
    noise_level: float = 0.7  # a of the Flow-SDE when sampler="flow_sde" (ignored by deterministic samplers)
    num_steps: int = 10  # deviation: official 40 collection steps
    shift: float = 1.0  # time shift of the sampling schedule and the training times
    guidance_scale: float = 1.0  # deviation: official CFG 4.5; CFG-free halves collection cost (module docstring)
    timestep_fraction: float = 0.99  # (t, ε) draws per kept sample: int(num_steps·fraction)
    sample_refresh_interval: int = 1  # deviation: official 40; 1 is RAFT's loop (sample with the latest θ)
    optimizer_steps_per_iteration: int = 1
    train_batch_size: int = 64
    ema_interval: int = 8  # FlowGRPO SFT/DPO scripts: EMA decay 0.9 every 8 steps

    def __post_init__(self) -> None:
        check_literals(self)
        check_flow_matching_settings(self)
        check_at_least(self, 1, "top_k", "ema_interval")


# FlowGRPO's official OnlineSFT setup (the notes' shared online baseline collection).
ONLINE_SFT = RAFTConfig(
    sampler="flow_sde", noise_level=0.7, num_steps=40, guidance_scale=4.5, sample_refresh_interval=40
)


def top_k_mask(rewards: Tensor, group_ids: Tensor, k: int, ties: Ties = "all_tied") -> Tensor:
    """(B,) bool: the sample is kept among its group's ``k`` best rewards.

    ``"exact_k"``: exactly ``min(k, G)`` per group, stable (the earlier sample wins a tie);
    ``"all_tied"``: every sample whose reward is at least the group's k-th best.
    """
    if rewards.ndim != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)")
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if ties not in ("all_tied", "exact_k"):
        raise ValueError(f"ties must be 'all_tied' or 'exact_k', got {ties!r}")
    mask = torch.zeros(rewards.shape, dtype=torch.bool)
    for members in group_members(group_ids):
        group_rewards = rewards[members]
        order = torch.sort(group_rewards, descending=True, stable=True).indices
        if ties == "exact_k":
            mask[members[order[:k]]] = True
        else:
            kth_best = group_rewards[order[min(k, len(members)) - 1]]
            mask[members[group_rewards >= kth_best]] = True
    return mask


class RAFT:
    """RAFT / online rejection-sampling fine-tuning on the common interface (see the module docstring)."""

    Config: ClassVar[type] = RAFTConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        trains_on_subset=True, guidance_fields=("guidance_scale",), sampler_field="sampler"
    )

    def __init__(self, cfg: RAFTConfig, policy: Policy, optim: Optimization) -> None:
        self.cfg = cfg
        self.core = RefreshedFlowMatching(cfg, policy, optim)

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        return self.core.collect(prompts, group_ids, generator)

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        device = rewards.device
        # The top-k choice depends on the rewards: made on the host, once per iteration, before the inner loop.
        rewards = rewards.cpu()
        chosen = top_k_mask(rewards, rollout.all_group_ids.cpu(), self.cfg.top_k, self.cfg.ties)
        kept = rollout.mine(to_device(chosen, device)).nonzero().flatten()
        # deviation: the zero-weight samples are not run (same loss and gradient; official: a pass on each).
        mean_over = rollout.x0.shape[0] if self.cfg.loss_mean == "all_samples" else None  # this process's samples
        logs = self.core.train(rollout, kept, torch.ones(len(kept), device=device), generator, mean_over=mean_over)
        logs["train/kept_reward_mean"] = rewards[chosen].mean().item()
        logs["train/kept_fraction"] = chosen.float().mean().item()
        return logs
