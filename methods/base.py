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

from harness.optim import Optimization
from harness.policy import Cond, Policy, unconditional
from harness.rollout import Trajectory, Window, rollout
from harness.samplers import Sampler
from harness.types import Prompt


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


def collect_trajectory(
    policy: Policy,
    sampler: Sampler,
    prompts: Sequence[Prompt],
    group_ids: Tensor,
    schedule: Tensor,
    generator: torch.Generator,
    *,
    guidance_scale: float,
    noise: Tensor | None = None,
    window: Window | None = None,
) -> Rollout:
    """Sample ``prompts`` on-policy (θ itself) and keep the trajectory: the collection of the GRPO family.

    ``noise``: the initial noise (default: one draw per sample from ``generator``); ``window``: the
    stochastic sampler only inside it (see :class:`harness.rollout.Window`).
    """
    texts = [p.text for p in prompts]
    if noise is None:
        noise = torch.randn((len(texts), *policy.sample_shape), generator=generator)
    cond = policy.encode(texts)
    trajectory = rollout(policy, sampler, cond, noise, schedule, guidance_scale=guidance_scale,
                         uncond=unconditional(policy, len(texts), guidance_scale), generator=generator,
                         keep_trajectory=True, window=window)  # fmt: skip
    return Rollout(list(prompts), group_ids, cond, trajectory.x0, trajectory)


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What a method needs from the harness, declared once on its class and read by the harness.

    Suites, the trainer, FSDP checks and the contract tests read these fields (never probe the class
    by reflection), so a new method is one file plus one registry line.
    """

    needs_log_prob: bool = False  # trains on a stochastic sampler's transition log-probs (coupled methods)
    needs_differentiable_reward: bool = False  # __init__ takes the training reward and backpropagates through it
    needs_whole_groups: bool = False  # each prompt's samples must sit on one process (online DPO's pairs)
    trains_on_subset: bool = False  # trains on a reward-chosen subset: FSDP pads its micro-batches with fillers
    fsdp: bool = True  # checked to run the same passes on every process under FSDP
    guidance_fields: tuple[str, ...] = ()  # config fields that set a true-CFG scale (1.0: off)
    sampler_field: str | None = None  # the config field naming a registered sampler, if the method has one


class Method(Protocol):
    """An online RL method for flow models."""

    Config: ClassVar[type]  # frozen dataclass defined in the method's file; validates itself in __post_init__
    capabilities: ClassVar[Capabilities]  # what the harness must provide and check (see Capabilities)

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
