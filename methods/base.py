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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from benchmarks.base import Prompt
from harness.optim import Optimization
from harness.policy import Cond, Policy, iter_batches
from harness.rollout import Trajectory


@dataclass(frozen=True)
class Rollout:
    """What a collection produced: clean samples, their prompts and groups, and (for
    reverse-process methods) the trajectory with its per-step log-probs.

    With several processes (:mod:`harness.distributed`) a rollout holds this process's share of
    the batch; the loop adds the whole batch's group ids and this share's positions in it, so
    that ``update`` computes per-prompt statistics over the whole batch (``all_group_ids``, the
    gathered rewards) and keeps this process's part with :meth:`mine`.
    """

    prompts: list[Prompt]
    group_ids: Tensor  # (B,) long: samples of one prompt share an id (per-prompt statistics)
    cond: Cond
    x0: Tensor  # (B, C, H, W)
    trajectory: Trajectory | None = None
    batch_group_ids: Tensor | None = None  # (N,) every process's group ids, in batch order (None: one process)
    batch_index: Tensor | None = None  # (B,) positions of this rollout's samples in that batch
    # Under FSDP every process must run the same passes: the most micro-batches any process has (a collective)
    equal_passes: Callable[[int], int] | None = None

    @property
    def all_group_ids(self) -> Tensor:
        """The group ids of the whole batch, aligned with the rewards ``update`` receives."""
        return self.group_ids if self.batch_group_ids is None else self.batch_group_ids

    @property
    def shared(self) -> bool:
        """True when other processes hold the rest of the batch."""
        return self.batch_index is not None

    def mine(self, per_sample: Tensor) -> Tensor:
        """This rollout's rows of a whole-batch per-sample tensor (N, ...) → (B, ...)."""
        return per_sample if self.batch_index is None else per_sample[self.batch_index]

    def held(self, positions: Tensor) -> Tensor:
        """The local positions of those whole-batch ``positions`` this rollout holds, in their order."""
        if self.batch_index is None:
            return positions
        local = {int(g): i for i, g in enumerate(self.batch_index.tolist())}
        return torch.tensor([local[int(p)] for p in positions.tolist() if int(p) in local], dtype=torch.long)


def optimizer_chunks(indices: Tensor, steps: int, generator: torch.Generator, *, pad: bool = False) -> list[Tensor]:
    """Split sample indices into ``steps`` near-equal chunks, one per optimizer step.

    With more than one step the indices are shuffled first (one ``randperm`` from ``generator``), as the
    official codes do; with one step they stay in order and nothing is drawn. Fewer indices than steps
    give fewer chunks, unless ``pad``: then empty chunks make up exactly ``steps``, as several processes
    need (each optimizer step averages gradients over all of them, so all must take the same number).
    """
    if steps < 1:
        raise ValueError(f"optimizer steps per iteration must be >= 1, got {steps}")
    if steps > 1:
        indices = indices[torch.randperm(len(indices), generator=generator)]
    chunks = [indices[s] for s in iter_batches(len(indices), max(1, -(-len(indices) // steps)))]
    return chunks + [indices[:0]] * (steps - len(chunks)) if pad else chunks


FILLER = torch.tensor([0])  # the local sample a filler pass computes on (its loss is scaled by 0)


def micro_batches(rollout: Rollout, chunk: Tensor, batch_size: int) -> list[Tensor | None]:
    """The micro-batches (sample indices) of one optimizer step's ``chunk``, in order.

    Where every process must run the same passes (FSDP: each forward all-gathers parameters), the list
    is padded with ``None`` to the most micro-batches any process has, since a method that keeps only
    some samples (FlowGRPO's non-zero-std groups, RAFT's best) can leave one process fewer. The
    caller runs each ``None`` as a filler: the same passes on :data:`FILLER` with its loss scaled by
    0 and a throwaway generator, left out of its logs. The compute meter counts filler passes.
    """
    batches = [chunk[b] for b in iter_batches(len(chunk), batch_size)]
    if rollout.equal_passes is None:
        return batches
    return batches + [None] * (rollout.equal_passes(len(batches)) - len(batches))


def filler_generator() -> torch.Generator:
    """The random draws of a filler pass, kept apart so that the real passes' draws do not depend on fillers."""
    return torch.Generator().manual_seed(0)


class Method(Protocol):
    """An online RL method for flow models."""

    Config: ClassVar[type]  # frozen dataclass defined in the method's file
    needs_log_prob: ClassVar[bool]  # True: needs a stochastic sampler's transition log-probs
    # Optional, False when absent: the method backpropagates through the reward, so its __init__ takes a
    # fourth argument, the (differentiable) training reward, and the harness refuses any other reward.
    # needs_differentiable_reward: ClassVar[bool]
    # Optional, False when absent: each prompt's samples must sit on one process (online DPO's pairs).
    # needs_whole_groups: ClassVar[bool]

    def __init__(self, cfg: Any, policy: Policy, optim: Optimization) -> None:
        """``policy`` is the harness's counting wrapper; ``optim`` owns AdamW, clipping and the EMA."""
        ...

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        """Sample one image per entry of ``prompts`` with the method's sampling weights and sampler."""
        ...

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        """Train on one collection given the raw rewards of the whole batch (N,), aligned with
        ``rollout.all_group_ids`` (N = B with one process); return ``train/<name>`` metrics.

        All randomness (training times, noise) comes from ``generator``.
        """
        ...
