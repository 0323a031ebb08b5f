"""The Policy protocol: what every model adapter (tiny DiT, SD3.5 + LoRA) offers the methods.

Conventions, shared by every method and sampler (rectified flow, as SD3):
``x_t = (1 − t)·x0 + t·ε``, velocity ``v = ε − x0``, ``t ∈ [0, 1]`` with ``t = 1`` pure noise.
Any other timestep scale (SD3's 0–1000) stays inside the adapter.

Three weight sets are selected through :meth:`Policy.use_weights` so that a method never cares
whether they are LoRA adapters of one network (SD3.5, as the official code does) or parameter
copies (tiny model): ``"train"`` (θ, the one with gradients), ``"old"`` (the sampling policy,
soft-updated ``old ← η·old + (1 − η)·θ``) and ``"ref"`` (the frozen initial model).

The device contract: a policy lives on one ``device``, and every tensor the sampling and training loops
create lives there too. Random draws come from seeded CPU generators (:mod:`harness.seeding`) and are moved
to the device once per rollout or micro-batch with :func:`to_device` (so a CPU and a GPU run see the same
noise); nothing in those loops reads a value back to the host (docs/architecture.md, "Devices").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

WeightSet = Literal["train", "old", "ref"]
WEIGHT_SETS: tuple[WeightSet, ...] = ("train", "old", "ref")


@dataclass(frozen=True)
class Cond:
    """Encoded prompts: named batch-first tensors (token embeddings, masks, pooled vectors)."""

    tensors: dict[str, Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, index: slice | Tensor | list[int]) -> Cond:
        return Cond({k: v[index] for k, v in self.tensors.items()})

    def repeat_interleave(self, repeats: int) -> Cond:
        """Each row ``repeats`` times in a row (one group of samples per prompt)."""
        return Cond({k: v.repeat_interleave(repeats, dim=0) for k, v in self.tensors.items()})

    def to(self, device: torch.device | str) -> Cond:
        return Cond({k: v.to(device) for k, v in self.tensors.items()})

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        keys = conds[0].tensors.keys()
        return Cond({k: torch.cat([c.tensors[k] for c in conds]) for k in keys})


@runtime_checkable
class Policy(Protocol):
    """A text-to-image flow model with three selectable weight sets."""

    sample_shape: tuple[int, ...]  # (C, H, W) of x0, latents or pixels
    supports_cfg: bool

    @property
    def device(self) -> torch.device:
        """Where the weights live, and where the sampling and training loops create every tensor."""
        ...

    def encode(self, prompts: Sequence[str]) -> Cond:
        """Encode prompts (the empty string is the unconditional prompt for CFG)."""
        ...

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """v(x_t, t, cond) under the selected weights; x_t (B, C, H, W), t (B,) in [0, 1]."""
        ...

    def decode(self, x0: Tensor) -> Tensor:
        """Clean samples → images (B, 3, H, W) in [0, 1]."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters of θ that the optimizer updates."""
        ...

    def use_weights(self, which: WeightSet) -> AbstractContextManager[None]:
        """Select θ ("train"), the sampling policy ("old") or the reference ("ref") inside the block."""
        ...

    def update_old(self, eta: float) -> None:
        """Soft update ``old ← η·old + (1 − η)·θ``; ``eta = 0`` copies θ into old."""
        ...


@runtime_checkable
class ResumablePolicy(Policy, Protocol):
    """A Policy whose weight sets can be saved and restored (needed to checkpoint and resume a run)."""

    def weight_state(self, which: WeightSet) -> dict[str, Tensor]:
        """A copy of the tensors of one weight set ("train" or "old"; "ref" never changes)."""
        ...

    def load_weight_state(self, which: WeightSet, state: dict[str, Tensor]) -> None: ...


def unconditional(policy: Policy, n: int, guidance_scale: float) -> Cond | None:
    """The empty prompt's encoding for ``n`` samples when CFG is on (scale ≠ 1), else None (``guided_velocity``'s ``uncond``)."""
    return policy.encode([""] * n) if guidance_scale != 1.0 else None


def guided_velocity(
    policy: Policy, x_t: Tensor, t: Tensor, cond: Cond, uncond: Cond | None, guidance_scale: float
) -> Tensor:
    """Classifier-free guidance ``v_u + w·(v_c − v_u)``; one batched call of 2B samples when ``w ≠ 1``."""
    if guidance_scale == 1.0:
        return policy.velocity(x_t, t, cond)
    if uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs an unconditional cond (encode([''] * B))")
    if not policy.supports_cfg:
        raise ValueError(f"{type(policy).__name__} does not support classifier-free guidance")
    v = policy.velocity(torch.cat([x_t, x_t]), torch.cat([t, t]), Cond.cat([uncond, cond]))
    v_uncond, v_cond = v.chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def policy_device(policy: Policy) -> torch.device:
    """``policy.device``; for a minimal stand-in without one (a test double of a few parameters), where its
    trainable parameters are."""
    device = getattr(policy, "device", None)
    return device if device is not None else policy.trainable_parameters()[0].device


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` on ``device``, the same tensor if it is there already; a host-to-device copy is queued without
    waiting for the device (no host sync; safe, the source is staged at once), a copy to the host waits."""
    return tensor.to(device, non_blocking=device.type != "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA device; nothing else queues): phase timings end here."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(n)``."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
