"""EMA of the trainable parameters, used for evaluation and saved checkpoints.

As the official DiffusionNFT/FlowGRPO ``EMAModuleWrapper``: decay ``min((1 + s)/(10 + s), max)``
at optimizer step ``s``, applied every ``interval`` steps. Under FSDP the parameters, and so the
shadows, are DTensor shards; the element-wise updates act on the shards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from harness.fsdp import local_like


class EMA:
    def __init__(self, parameters: Sequence[nn.Parameter], max_decay: float = 0.9, interval: int = 1) -> None:
        self.parameters = list(parameters)
        self.shadow: list[Tensor] = [p.detach().clone() for p in self.parameters]
        self.max_decay, self.interval = max_decay, interval

    def decay(self, step: int) -> float:
        return min((1 + step) / (10 + step), self.max_decay)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step ``step`` (1-based)."""
        if step % self.interval:
            return
        decay = self.decay(step)
        for shadow, param in zip(self.shadow, self.parameters, strict=True):
            shadow.mul_(decay).add_(param.detach(), alpha=1 - decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Swap the EMA weights into the parameters inside the block."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.parameters]
            for param, shadow in zip(self.parameters, self.shadow, strict=True):
                param.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.parameters, backup, strict=True):
                    param.copy_(saved)

    def state_dict(self) -> dict[str, object]:
        return {"shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Copy saved shadows in (full tensors are cut to this process's shard under FSDP)."""
        for shadow, saved in zip(self.shadow, state["shadow"], strict=True):  # type: ignore[call-overload]
            shadow.copy_(local_like(saved, shadow))
