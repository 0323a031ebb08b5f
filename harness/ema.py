"""EMA of the trainable parameters, used for evaluation and saved checkpoints.

As the official DiffusionNFT/FlowGRPO/AWM ``EMAModuleWrapper``: decay ``min((1 + s)/(10 + s), max)``
after optimizer step ``s`` (1-based), applied when ``(s + 1) % interval == 0`` (the wrapper's
``(optimization_step + 1) % update_step_interval``: with interval 8, after steps 7, 15, 23, …).

``updates_per_step = G`` reproduces FlowGRPO's training loop (``train_sd3.py``, ``train_sd3_fast.py``),
which calls ``ema.step(global_step)`` after every micro-batch, not after every optimizer step: an
update step ``s`` is applied G times (G = ``gradient_accumulation_steps``, the micro-batches per
optimizer step), once right after the step and G − 1 times during the next step's accumulation,
all with the weights θ_s and the decay of step s, so the step's effective decay is ``d^G`` (0.81
for d = 0.9 and the GenEval config's G = 2). Here the first application happens in :meth:`update`
and the G − 1 others are *pending* until :meth:`flush`, which the optimizer calls before its next
step (the weights are still θ_s then): the same order, so an evaluation between two steps sees
what the official evaluation sees. Under FSDP the parameters, and so the shadows, are DTensor
shards; the element-wise updates act on the shards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from harness.fsdp import local_like


class EMA:
    def __init__(
        self, parameters: Sequence[nn.Parameter], max_decay: float = 0.9, interval: int = 1, updates_per_step: int = 1
    ) -> None:
        if interval < 1 or updates_per_step < 1:
            raise ValueError(f"interval and updates_per_step must be >= 1, got {interval}, {updates_per_step}")
        self.parameters = list(parameters)
        self.shadow: list[Tensor] = [p.detach().clone() for p in self.parameters]
        self.max_decay, self.interval, self.updates_per_step = max_decay, interval, updates_per_step
        self.pending, self.pending_decay = 0, 0.0  # applications of the last update step still to come

    def decay(self, step: int) -> float:
        return min((1 + step) / (10 + step), self.max_decay)

    @torch.no_grad()
    def _apply(self, decay: float, times: int) -> None:
        """``times`` updates with the current weights: ``shadow ← d^n·shadow + (1 − d^n)·θ``."""
        kept = decay**times
        for shadow, param in zip(self.shadow, self.parameters, strict=True):
            shadow.mul_(kept).add_(param.detach(), alpha=1 - kept)

    def update(self, step: int) -> None:
        """Call after optimizer step ``step`` (1-based): the first of its ``updates_per_step`` applications."""
        if self.pending:
            raise RuntimeError(f"{self.pending} EMA applications of the last step are pending: flush() them first")
        if (step + 1) % self.interval:
            return
        decay = self.decay(step)
        self._apply(decay, 1)
        self.pending, self.pending_decay = self.updates_per_step - 1, decay

    def flush(self) -> None:
        """Apply the pending applications of the last update step (call before the weights change again)."""
        if self.pending:
            self._apply(self.pending_decay, self.pending)
        self.pending = 0

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
        return {
            "shadow": [s.clone() for s in self.shadow],
            "pending": self.pending,
            "pending_decay": self.pending_decay,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Copy saved shadows in (full tensors are cut to this process's shard under FSDP)."""
        for shadow, saved in zip(self.shadow, state["shadow"], strict=True):  # type: ignore[call-overload]
            shadow.copy_(local_like(saved, shadow))
        self.pending, self.pending_decay = int(state["pending"]), float(state["pending_decay"])  # type: ignore[call-overload, arg-type]
