"""Compute accounting: one ledger that every policy call goes through.

:class:`CountingPolicy` wraps any :class:`~harness.policy.Policy`; each ``velocity`` call adds
its batch size to the forward count of the current phase, and, when the output carries a
gradient, the same to the backward count (a grad-enabled call is assumed to be backpropagated).
CFG batches the conditional and unconditional halves into one call of 2B samples, so it counts
double by construction. Methods never count for themselves, so they cannot under-report.

The budget unit is defined once: ``fwd_equiv = forward + 2·backward`` over the non-eval phases.
FLOPs use the model's forward FLOPs per sample, measured once with
``torch.utils.flop_counter``, and 2× that per backward.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from harness.policy import Cond, Policy, WeightSet, policy_device

Phase = Literal["sampling", "reward", "training", "eval", "other"]
PHASES: tuple[Phase, ...] = ("sampling", "reward", "training", "eval", "other")


@dataclass
class Ledger:
    """Counters per phase: per-sample forward and backward passes, images, wall seconds."""

    forward: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    backward: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    images: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    flops_per_forward: float | None = None  # per sample
    current: Phase = "other"
    _open: list[Phase] = field(default_factory=list, repr=False)

    @contextmanager
    def phase(self, name: Phase) -> Iterator[None]:
        """Attribute calls and wall time inside the block to ``name`` (nesting restores the outer)."""
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; allowed: {', '.join(PHASES)}")
        outer, self.current = self.current, name
        self._open.append(name)
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self._open.pop()
            self.seconds[name] += elapsed
            if self._open and self._open[-1] != name:
                self.seconds[self._open[-1]] -= elapsed  # time is counted once, in the innermost phase
            self.current = outer

    def state_dict(self) -> dict[str, object]:
        """The counters (for checkpoints); the open-phase stack is not saved: checkpoints happen outside phases."""
        return {"forward": dict(self.forward), "backward": dict(self.backward), "images": dict(self.images),
                "seconds": dict(self.seconds), "flops_per_forward": self.flops_per_forward}  # fmt: skip

    def load_state_dict(self, state: dict[str, object]) -> None:
        for name in ("forward", "backward", "images", "seconds"):
            getattr(self, name).update(state[name])
        self.flops_per_forward = state["flops_per_forward"]  # type: ignore[assignment]

    def record_forward(self, n_samples: int, with_backward: bool) -> None:
        self.forward[self.current] += n_samples
        if with_backward:
            self.backward[self.current] += n_samples

    def record_images(self, n_images: int) -> None:
        self.images[self.current] += n_images

    @property
    def fwd_equiv(self) -> int:
        """Policy forward-equivalents spent on training work: forward + 2·backward, eval excluded."""
        return sum(self.forward[p] + 2 * self.backward[p] for p in PHASES if p != "eval")

    @property
    def flops(self) -> float | None:
        """Model FLOPs of the training work (eval excluded); None until measured."""
        if self.flops_per_forward is None:
            return None
        return self.fwd_equiv * self.flops_per_forward

    def snapshot(self) -> dict[str, float]:
        """Flat ``compute/<counter>`` numbers for result rows."""
        row: dict[str, float] = {"compute/fwd_equiv": self.fwd_equiv}
        if self.flops is not None:
            row["compute/flops"] = self.flops
        for p in PHASES:
            row[f"compute/{p}_fwd"] = self.forward[p]
            row[f"compute/{p}_bwd"] = self.backward[p]
            row[f"compute/{p}_seconds"] = round(self.seconds[p], 4)
        row["compute/images_sampled"] = self.images["sampling"]
        row["compute/wall_seconds"] = round(sum(self.seconds[p] for p in PHASES if p != "eval"), 4)
        return row


def measure_forward_flops(policy: Policy, x_t: Tensor, t: Tensor, cond: Cond) -> float:
    """FLOPs of one forward pass per sample, counted by ``torch.utils.flop_counter``.

    Runs with autograd enabled (the counter's module tracker needs it) and discards the output.
    """
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        policy.velocity(x_t.detach(), t.detach(), Cond({k: v.detach() for k, v in cond.tensors.items()}))
    return counter.get_total_flops() / x_t.shape[0]


class CountingPolicy:
    """A Policy that records every velocity call in a :class:`Ledger`, then delegates."""

    def __init__(self, policy: Policy, ledger: Ledger) -> None:
        self.inner = policy
        self.ledger = ledger
        self.sample_shape = policy.sample_shape
        self.supports_cfg = policy.supports_cfg

    @property
    def device(self) -> torch.device:
        return policy_device(self.inner)

    def encode(self, prompts: Sequence[str]) -> Cond:
        return self.inner.encode(prompts)

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if self.ledger.flops_per_forward is None:
            self.ledger.flops_per_forward = measure_forward_flops(self.inner, x_t[:1], t[:1], cond[:1])
        v = self.inner.velocity(x_t, t, cond)
        self.ledger.record_forward(x_t.shape[0], with_backward=v.requires_grad)
        return v

    def decode(self, x0: Tensor) -> Tensor:
        self.ledger.record_images(x0.shape[0])  # every sampled image is decoded exactly once
        return self.inner.decode(x0)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.inner.trainable_parameters()

    def use_weights(self, which: WeightSet) -> AbstractContextManager[None]:
        return self.inner.use_weights(which)

    def update_old(self, eta: float) -> None:
        self.inner.update_old(eta)
