"""Group-relative advantages shared by every method (FlowGRPO's ``PerPromptStatTracker``).

``A_i = (r_i − mean_{g(i)}) / (std + eps)``: the mean is per prompt group within the batch;
the std is one population std over all rewards of the batch (``std="global"``, the official
SD3 configs of FlowGRPO and DiffusionNFT) or per group (``std="group"``, FlowGRPO's Eq. 3 as
written).

Everything is computed where the rewards are (the policy's device in the training loop). ``torch.unique``
reads the group count back once per call: these run once per iteration, before the inner loops.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

StdMode = Literal["global", "group"]


def group_means(values: Tensor, group_ids: Tensor) -> Tensor:
    """Each sample's group mean, (B,)."""
    groups, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = len(groups)  # = inverse.max() + 1, without reading it back
    sums = torch.zeros(n_groups, dtype=torch.float64, device=values.device).index_add_(0, inverse, values.double())
    counts = torch.zeros(n_groups, dtype=torch.float64, device=values.device).index_add_(
        0, inverse, torch.ones_like(values, dtype=torch.float64)
    )
    return (sums / counts)[inverse]


def group_stds(values: Tensor, group_ids: Tensor) -> Tensor:
    """Each sample's group population std, (B,)."""
    centred = values.double() - group_means(values, group_ids)
    return group_means(centred**2, group_ids).sqrt()


def group_advantages(rewards: Tensor, group_ids: Tensor, std: StdMode = "global", eps: float = 1e-4) -> Tensor:
    """Per-prompt-centred rewards over the global (or per-group) std + ``eps``, float32 (B,)."""
    if rewards.ndim != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)")
    if std not in ("global", "group"):
        raise ValueError(f"std must be 'global' or 'group', got {std!r}")
    centred = rewards.double() - group_means(rewards, group_ids)
    scale = rewards.double().std(unbiased=False) if std == "global" else group_stds(rewards, group_ids)
    return (centred / (scale + eps)).float()


def zero_std_groups(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """(B,) bool: the sample's group has all-equal rewards (no learning signal)."""
    return group_stds(rewards, group_ids) == 0
