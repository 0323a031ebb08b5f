"""Optimizer mechanics shared by every method: AdamW, gradient clipping, the step counter, EMA.

A method computes its loss and calls :meth:`Optimization.backward` and :meth:`Optimization.step`;
it never builds its own optimizer, so every method trains with the same machinery. A non-finite
loss stops the run with an error instead of poisoning the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from harness.ema import EMA
from harness.fsdp import full_tensor, local_optimizer_state
from harness.validation import require


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW as the official FlowGRPO/DiffusionNFT configs (``config/base.py``), lr aside.

    The official lr 3e-4 is for LoRA on a 2.5B model; full fine-tuning of the tiny 2M-parameter
    shapes model needs a far smaller one (see the README).
    """

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema_max_decay: float = 0.9

    def __post_init__(self) -> None:
        for name in ("lr", "eps", "grad_clip"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, name, value, "a finite number > 0")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay,
                "a finite number >= 0")  # fmt: skip
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
                "two numbers in [0, 1)")  # fmt: skip
        require(0 <= self.ema_max_decay < 1, "ema_max_decay", self.ema_max_decay, "in [0, 1)")


class Optimization:
    """AdamW over the policy's trainable parameters plus the EMA that evaluation uses."""

    def __init__(
        self,
        parameters: Sequence[nn.Parameter],
        cfg: OptimConfig,
        ema_interval: int = 1,
        gradient_sync: Callable[[list[nn.Parameter]], None] | None = None,
        *,
        ema_updates_per_step: int = 1,
        ema_max_decay: float | None = None,
        defer_loss_checks: bool = False,
    ) -> None:
        """``gradient_sync`` runs on the accumulated gradients before each step (several processes:
        :meth:`harness.distributed.Processes.average_gradients`; under FSDP, whose backward averages, only
        :func:`harness.fsdp.zero_missing_gradients`).

        The EMA follows the method's own schedule (:func:`method_ema_settings`): ``ema_interval``,
        ``ema_updates_per_step`` (FlowGRPO's per-micro-batch stepping, :mod:`harness.ema`) and
        ``ema_max_decay`` (a method's official ``eval_ema_decay``; None: ``cfg.ema_max_decay``).

        Under FSDP the parameters are DTensor shards: the optimizer moments and the EMA are shards too,
        the grad norm is over the whole gradient, and :meth:`load_state_dict` takes full tensors.

        ``defer_loss_checks`` (the training loop's setting): check the losses' finiteness at the next
        :meth:`step`, before the weights change, in the one read of the grad norm, instead of one host sync
        per :meth:`backward`."""
        self.parameters = list(parameters)
        self.gradient_sync = gradient_sync
        if not self.parameters:
            raise ValueError("the policy has no trainable parameters")
        self.cfg = cfg
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps
        )
        max_decay = cfg.ema_max_decay if ema_max_decay is None else ema_max_decay
        require(0 <= max_decay < 1, "ema_max_decay", max_decay, "in [0, 1)")
        self.ema = EMA(self.parameters, max_decay=max_decay, interval=ema_interval,
                       updates_per_step=ema_updates_per_step)  # fmt: skip
        self.global_step = 0
        self.defer_loss_checks = defer_loss_checks
        self._unchecked: list[Tensor] = []  # this step's losses, with defer_loss_checks

    def backward(self, loss: Tensor, scale: float = 1.0) -> None:
        """``(loss·scale).backward()`` after checking that the loss is finite (deferred: see ``defer_loss_checks``)."""
        if self.defer_loss_checks:
            self._unchecked.append(loss.detach())
        elif not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at optimizer step {self.global_step + 1}")
        (loss * scale).backward()

    def _read_grad_norm(self, grad_norm: Tensor) -> float:
        """The grad norm, read back together with the deferred finiteness check of this step's losses."""
        losses, self._unchecked = self._unchecked, []
        if not losses:
            return float(grad_norm)
        values = torch.stack([loss.double().reshape(()) for loss in losses])
        finite, norm = torch.stack([torch.isfinite(values).all().double(), grad_norm.double()]).tolist()
        if not finite:
            bad = values[~torch.isfinite(values)][0].item()
            raise FloatingPointError(f"non-finite loss {bad} at optimizer step {self.global_step + 1}")
        return norm

    def step(self) -> float:
        """Sync, clip, step, zero the grads, advance the step counter and the EMA; returns the grad norm."""
        if self.gradient_sync is not None:
            self.gradient_sync(self.parameters)
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.parameters, self.cfg.grad_clip))
        norm = self._read_grad_norm(grad_norm)  # before the weights change: a non-finite loss stops here
        self.ema.flush()  # the last update step's pending EMA applications see its weights, as in FlowGRPO
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.ema.update(self.global_step)
        return norm

    def state_dict(self) -> dict[str, object]:
        """Optimizer moments, EMA weights and the step counter (everything a resumed run needs; shards under FSDP)."""
        return {"optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict(), "global_step": self.global_step}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`'s values, given as full tensors or (without FSDP) as saved."""
        optimizer = local_optimizer_state(state["optimizer"], self.parameters)  # type: ignore[arg-type]
        self.optimizer.load_state_dict(optimizer)
        self.ema.load_state_dict(state["ema"])  # type: ignore[arg-type]
        self.global_step = int(state["global_step"])  # type: ignore[call-overload]


def method_ema_settings(method_cfg: Any) -> dict[str, Any]:
    """The EMA keywords of :class:`Optimization` that a method config sets: always ``ema_interval``; and,
    where the method's official schedule needs them (its config then has the field), ``ema_updates_per_step``
    (FlowGRPO's per-micro-batch stepping) and ``eval_ema_decay`` (its official maximum decay, overriding the
    suite's ``optim.ema_max_decay``). Every other method keeps 1 update per step and the suite's decay.
    """
    settings: dict[str, Any] = {"ema_interval": method_cfg.ema_interval}
    if hasattr(method_cfg, "ema_updates_per_step"):
        settings["ema_updates_per_step"] = method_cfg.ema_updates_per_step
    if hasattr(method_cfg, "eval_ema_decay"):
        settings["ema_max_decay"] = method_cfg.eval_ema_decay
    return settings
