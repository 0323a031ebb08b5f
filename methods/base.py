"""The Method protocol: what differs between methods, and nothing else.

The harness owns the loop (one loop for every method, so control flow cannot bias a
comparison): sample prompts → ``collect`` (sampling phase) → decode and score with the shared
rewards (reward phase) → ``update`` (training phase) → evaluate on schedule. Every policy call
goes through the shared compute meter, so a method never counts its own compute.

A method file holds, in order: a module docstring citing the paper and equations, a frozen
``<Name>Config`` dataclass whose fields name the paper's symbols, pure loss functions, and the
class implementing this protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from benchmarks.base import Prompt
from harness.optim import Optimization
from harness.policy import Cond, Policy
from harness.rollout import Trajectory


@dataclass(frozen=True)
class Rollout:
    """What a collection produced: clean samples, their prompts and groups, and (for
    reverse-process methods) the trajectory with its per-step log-probs."""

    prompts: list[Prompt]
    group_ids: Tensor  # (B,) long: samples of one prompt share an id (per-prompt statistics)
    cond: Cond
    x0: Tensor  # (B, C, H, W)
    trajectory: Trajectory | None = None


class Method(Protocol):
    """An online RL method for flow models."""

    Config: ClassVar[type]  # frozen dataclass defined in the method's file
    needs_log_prob: ClassVar[bool]  # True: needs a stochastic sampler's transition log-probs

    def __init__(self, cfg: Any, policy: Policy, optim: Optimization) -> None:
        """``policy`` is the harness's counting wrapper; ``optim`` owns AdamW, clipping and the EMA."""
        ...

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        """Sample one image per entry of ``prompts`` with the method's sampling weights and sampler."""
        ...

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        """Train on one collection given its raw rewards (B,); return ``train/<name>`` metrics.

        All randomness (training times, noise) comes from ``generator``.
        """
        ...
