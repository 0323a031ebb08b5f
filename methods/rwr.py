"""RWR: reward-weighted regression on the flow-matching loss (Lee et al., arXiv 2302.12192, 2023;
FlowGRPO's "Flow-RWR" baseline, arXiv 2505.05470 §5).

Each clean sample's pretraining loss is weighted by a function of its reward:

    L(θ) = mean_i w_i · ‖v_θ(x_t^i, t, c_i) − (ε − x0^i)‖²,   x_t = (1 − t)·x0 + t·ε

Weights (``weights``): paper vs official code, both supported.

* ``"raw"`` (default, official code): ``w_i = r_i``. FlowGRPO's ``stat_tracking.py`` type ``"rwr"``
  returns the raw reward as the advantage; its group-softmax line is commented out. Rewards must
  be ≥ 0 here (a negative weight would *maximise* that sample's flow-matching error, a loss
  unbounded below), which raises; use ``"softmax"`` for signed rewards.
* ``"softmax"`` (the paper; the notes' "``w = softmax_group(r)`` (Flow-GRPO's baseline) or
  ``exp(r/τ)``"): ``w_i = G_i · exp(r_i/τ) / Σ_{j ∈ g(i)} exp(r_j/τ)``. The factor G_i (the group
  size) makes the weights average to 1 within a group, so equal rewards give plain flow matching
  and the loss scale does not depend on the group size (the official commented-out line has no
  G and τ = 1). τ → ∞ is flow matching on all samples, τ → 0 keeps only each group's best (RAFT
  top-1). The default τ = 0.1, not the paper's plain softmax (τ = 1): with rewards in [0, 1]
  (GenEval partial credit, the shapes reward) in-group gaps are ~0.1, which τ = 1 turns into
  weights within ±10 % of uniform; τ = 0.1 makes a 0.1 reward gap a factor e. τ is in reward
  units, so rescale it with the reward (PickScore/26 gaps are ~0.01–0.05: τ ≈ 0.01).

Sampling setup: as :mod:`methods.raft` (same shared :class:`methods.forward_process.RefreshedFlowMatching`).
The default collection is CFG-free DPM-Solver++(2M) at 10 steps with the sampler refreshed every
step, marked ``# deviation:`` (CFG-free forward-process baselines halve the collection cost on
the shapes CPU benchmark and share DiffusionNFT's collector); :data:`FLOW_RWR` is the notes'
official online setup (Flow-SDE a = 0.7, CFG 4.5, 40 steps, refresh every 40 steps).
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
from harness.validation import check_at_least, check_literals, check_positive
from methods.base import Capabilities, Rollout
from methods.forward_process import RefreshedFlowMatching, check_flow_matching_settings, group_members

Weights = Literal["raw", "softmax"]


@dataclass(frozen=True, kw_only=True)
class RWRConfig:
    """Flow-RWR hyperparameters; weights as the official code, collection CFG-free (see the module docstring)."""

    weights: Weights = "raw"  # "raw": w = r (official FlowGRPO tracker); "softmax": G·softmax_group(r/τ) (paper)
    temperature: float = 0.1  # τ of the softmax, in reward units (paper: 1; see the module docstring)
    sampler: str = "dpm2"  # deviation: official flow_sde
    noise_level: float = 0.7  # a of the Flow-SDE when sampler="flow_sde"
    num_steps: int = 10  # deviation: official 40 collection steps
    shift: float = 1.0
    guidance_scale: float = 1.0  # deviation: official CFG 4.5; CFG-free halves collection cost
    timestep_fraction: float = 0.99  # (t, ε) draws per sample: int(num_steps·fraction)
    sample_refresh_interval: int = 1  # deviation: official 40 (optimizer steps between θ → sampling-policy copies)
    optimizer_steps_per_iteration: int = 1
    train_batch_size: int = 64
    ema_interval: int = 8

    def __post_init__(self) -> None:
        check_literals(self)
        check_flow_matching_settings(self)
        check_positive(self, "temperature")
        check_at_least(self, 1, "ema_interval")


# FlowGRPO's official online Flow-RWR setup (the notes' shared online baseline collection).
FLOW_RWR = RWRConfig(sampler="flow_sde", noise_level=0.7, num_steps=40, guidance_scale=4.5, sample_refresh_interval=40)


def group_softmax_weights(rewards: Tensor, group_ids: Tensor, temperature: float) -> Tensor:
    """(B,) ``G·softmax_{g(i)}(r/τ)``: each group's weights average to 1 (computed in float64)."""
    if rewards.ndim != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    weights = torch.empty(rewards.shape, dtype=torch.float64)
    for members in group_members(group_ids):
        weights[members] = len(members) * torch.softmax(rewards[members].double() / temperature, dim=0)
    return weights.float()


def rwr_weights(rewards: Tensor, group_ids: Tensor, weights: Weights, temperature: float) -> Tensor:
    """(B,) RWR weights: the raw rewards (official; must be ≥ 0) or :func:`group_softmax_weights`."""
    if weights == "softmax":
        return group_softmax_weights(rewards, group_ids, temperature)
    if weights == "raw":
        if rewards.ndim != 1:
            raise ValueError(f"rewards must be (B,), got {tuple(rewards.shape)}")
        if (rewards < 0).any():
            raise ValueError(
                f"weights='raw' needs rewards >= 0 (min {rewards.min().item():.4g}): a negative weight maximises "
                "that sample's flow-matching error; use weights='softmax' for signed rewards"
            )
        return rewards.float().clone()
    raise ValueError(f"weights must be 'raw' or 'softmax', got {weights!r}")


class RWR:
    """Flow-RWR on the common interface (see the module docstring)."""

    Config: ClassVar[type] = RWRConfig
    capabilities: ClassVar[Capabilities] = Capabilities(guidance_fields=("guidance_scale",), sampler_field="sampler")

    def __init__(self, cfg: RWRConfig, policy: Policy, optim: Optimization) -> None:
        self.cfg = cfg
        self.core = RefreshedFlowMatching(cfg, policy, optim)

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        return self.core.collect(prompts, group_ids, generator)

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        # The weights depend on the rewards (and refuse negative ones): made on the host, once per iteration.
        weights = rwr_weights(rewards.cpu(), rollout.all_group_ids.cpu(), self.cfg.weights, self.cfg.temperature)
        weights = rollout.mine(to_device(weights, rewards.device))
        logs = self.core.train(rollout, torch.arange(len(weights), device=weights.device), weights, generator)
        weight_max, total_sq, total = torch.stack([weights.max(), (weights**2).sum(), weights.sum()]).tolist()
        logs["train/weight_max"] = weight_max
        # Effective sample size of the weights, as a fraction of the batch (1: uniform; 0 if every weight is 0).
        logs["train/weight_ess"] = (total**2 / total_sq / len(weights)) if total_sq > 0 else 0.0
        return logs
