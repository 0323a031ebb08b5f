"""Above-mean flow matching: flow matching on each prompt group's better-than-average samples (an example)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from harness.accumulate import MicroBatch, accumulate
from harness.advantages import group_advantages
from harness.optim import Optimization
from harness.policy import Policy
from harness.samplers import EulerODE, flow_schedule, noised
from harness.types import Prompt
from harness.validation import check_at_least
from methods.base import Capabilities, Rollout
from methods.forward_process import collect_clean, flow_matching_error


@dataclass(frozen=True, kw_only=True)
class AboveMeanConfig:
    num_steps: int = 10  # Euler steps of the CFG-free collection
    train_batch_size: int = 64
    optimizer_steps_per_iteration: int = 1
    ema_interval: int = 1

    def __post_init__(self) -> None:
        check_at_least(self, 1, "num_steps", "train_batch_size", "optimizer_steps_per_iteration", "ema_interval")


class AboveMean:
    Config: ClassVar[type] = AboveMeanConfig
    capabilities: ClassVar[Capabilities] = Capabilities(trains_on_subset=True)

    def __init__(self, cfg: AboveMeanConfig, policy: Policy, optim: Optimization) -> None:
        self.cfg, self.policy, self.optim = cfg, policy, optim
        self.schedule = flow_schedule(cfg.num_steps)

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        return collect_clean(self.policy, EulerODE(), self.schedule, prompts, group_ids, generator,
                             guidance_scale=1.0, weights="train")  # fmt: skip

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        above = rollout.mine(group_advantages(rewards, rollout.all_group_ids) > 0).nonzero().flatten()

        def loss(batch: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]:
            x0, cond = rollout.x0[batch.items], rollout.cond[batch.items]
            t, noise = torch.rand(len(x0), generator=batch.generator), torch.randn(x0.shape, generator=batch.generator)
            error = flow_matching_error(self.policy.velocity(noised(x0, noise, t), t, cond), x0, noise)
            return error.mean(), {"fm_error": error.detach().mean()}

        return accumulate(self.optim, above, loss, generator=generator, batch_size=self.cfg.train_batch_size,
                          optimizer_steps=self.cfg.optimizer_steps_per_iteration, pad=rollout.shared,
                          equal_passes=rollout.equal_passes)  # fmt: skip
