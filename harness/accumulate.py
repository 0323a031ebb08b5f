"""The one inner update loop: every method's ``update`` accumulates its gradients through :func:`accumulate`.

A method says which items train (sample or pair indices), how many passes each item gets per optimizer
step (``repeats``: training timesteps or fresh (t, ε) draws) and how to compute one micro-batch's loss;
this loop does the rest, identically for every method:

1. split the items into ``optimizer_steps`` chunks, shuffled across steps when there are several (one
   ``randperm`` from the update's generator, as the official codes do; in order with one step);
2. per chunk, optionally let the method draw per-chunk randomness (``on_chunk``), then run
   ``repeats × micro-batches`` passes (repeat outer, micro-batch inner, as every official code loops);
3. under FSDP pad each process's micro-batches with *filler* passes to the most any process has, since
   every forward all-gathers parameters (:func:`methods.base.micro_batches` semantics): a filler runs the
   same passes on one sample with its own throwaway generator, its loss scaled by 0 and left out of logs;
4. scale each micro-batch's loss — a mean over its items — by its share of the step's passes,
   ``len(items) / (len(chunk) · repeats)``. Summed over the step that is exactly the gradient of the plain
   mean over every (item, repeat) pair: **one rule, per-sample weights**, so no sample counts more because
   its micro-batch is short. (The official codes weight each micro-batch equally, which is the same rule
   because their micro-batches are always equal-sized; methods whose official loss is not a per-item mean
   put their official weights inside the loss and say so.)
5. step the optimizer after each chunk and average every logged value over all real passes of all steps
   (weighted by the same shares), reading values back from the device once per update.

Nothing in the passes reads a value back to the host: item indices stay where ``items`` is (the policy's
device), the shuffle is drawn on the CPU and moved there once, logged values accumulate on the device, and the
trainer's optimizer reads its grad norm and the finiteness of the step's losses together, once per step
(``defer_loss_checks`` of :class:`harness.optim.Optimization`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from harness.policy import iter_batches, to_device

FILLER_ITEMS = torch.tensor([0])  # the local item a filler pass computes on (its loss is scaled by 0)


class Stepper(Protocol):
    """What the loop needs of the optimizer (:class:`harness.optim.Optimization`)."""

    def backward(self, loss: Tensor, scale: float = 1.0) -> None: ...

    def step(self) -> float: ...


@dataclass(frozen=True)
class MicroBatch:
    """One pass of the loop: which items, where they sit in their chunk, and which repeat it is."""

    items: Tensor  # (b,) long: indices into the method's items (samples or pairs); FILLER_ITEMS for a filler
    positions: slice  # these items' positions in their chunk (index per-chunk draws); slice(0, 1) for a filler
    index: int  # this micro-batch's place among its chunk's micro-batches
    repeat: int  # which of the ``repeats`` passes over the chunk (a training timestep or a (t, ε) draw)
    chunk: int  # which optimizer step of this update
    filler: bool  # an FSDP filler pass: the same compute, loss scaled by 0, nothing learned or logged
    generator: torch.Generator  # the update's generator, or a throwaway one for a filler
    chunk_state: Any = None  # what ``on_chunk`` returned for this chunk


LossFn = Callable[[MicroBatch], tuple[Tensor, Mapping[str, Tensor | float]]]


def optimizer_chunks(indices: Tensor, steps: int, generator: torch.Generator, *, pad: bool = False) -> list[Tensor]:
    """Split item indices into ``steps`` near-equal chunks, one per optimizer step.

    With more than one step the indices are shuffled first (one ``randperm`` from ``generator``), as the
    official codes do; with one step they stay in order and nothing is drawn. Fewer indices than steps
    give fewer chunks, unless ``pad``: then empty chunks make up exactly ``steps``, as several processes
    need (each optimizer step averages gradients over all of them, so all must take the same number).
    """
    if steps < 1:
        raise ValueError(f"optimizer steps per iteration must be >= 1, got {steps}")
    if steps > 1:
        indices = indices[to_device(torch.randperm(len(indices), generator=generator), indices.device)]
    chunks = [indices[s] for s in iter_batches(len(indices), max(1, -(-len(indices) // steps)))]
    return chunks + [indices[:0]] * (steps - len(chunks)) if pad else chunks


def filler_items(device: torch.device) -> Tensor:
    """:data:`FILLER_ITEMS` on ``device`` (where the items are)."""
    return to_device(FILLER_ITEMS, device)


def host_floats(values: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Logged scalars as Python floats, every tensor read back in one copy (exact: read as float64)."""
    tensors = [value for value in values.values() if isinstance(value, Tensor)]
    read = iter(
        torch.stack([to_device(t.detach(), tensors[0].device).double().reshape(()) for t in tensors]).tolist()
        if tensors
        else []
    )
    return {key: next(read) if isinstance(value, Tensor) else float(value) for key, value in values.items()}


def filler_generator() -> torch.Generator:
    """The random draws of a filler pass, kept apart so that the real passes' draws do not depend on fillers."""
    return torch.Generator().manual_seed(0)


def micro_batch_positions(size: int, batch_size: int, equal_passes: Callable[[int], int] | None) -> list[slice | None]:
    """The positions of each micro-batch of a chunk of ``size`` items, as :func:`accumulate` runs them; ``None``
    entries are FSDP fillers (a method that precomputes per-pass values before the update walks the same list)."""
    batches: list[slice | None] = list(iter_batches(size, batch_size))
    if equal_passes is None:
        return batches
    return batches + [None] * (equal_passes(len(batches)) - len(batches))


def accumulate(
    optim: Stepper,
    items: Tensor,
    loss_fn: LossFn,
    *,
    generator: torch.Generator,
    optimizer_steps: int,
    batch_size: int,
    repeats: int = 1,
    pad: bool = False,
    equal_passes: Callable[[int], int] | None = None,
    on_chunks: Callable[[list[Tensor], torch.Generator], None] | None = None,
    on_chunk: Callable[[int, Tensor, torch.Generator], Any] | None = None,
) -> dict[str, float]:
    """Train on ``items`` with ``optimizer_steps`` steps of ``repeats × micro-batches`` passes each.

    ``loss_fn(batch)`` returns the micro-batch's loss, a mean over its items, and the values to log (scalars,
    tensors kept on their device). ``pad`` and ``equal_passes`` come from the rollout (several processes:
    :attr:`methods.base.Rollout.shared` and ``equal_passes``). ``on_chunks(chunks, generator)`` runs once after
    the split, before any pass (e.g. log-likelihoods under θ before this update); ``on_chunk(c, chunk,
    generator)`` runs once per chunk before its passes (per-chunk draws), and its result reaches every pass
    of that chunk as ``batch.chunk_state``.
    Returns the logs averaged over every real pass as ``train/<name>``, plus ``train/grad_norm``, the mean over
    this update's optimizer steps.
    """
    if repeats < 1 or batch_size < 1:
        raise ValueError(f"repeats and batch_size must be >= 1, got {repeats}, {batch_size}")
    chunks = optimizer_chunks(items, optimizer_steps, generator, pad=pad)
    filler_batch = filler_items(items.device)
    totals: dict[str, Tensor | float] = {}
    grad_norms: list[float] = []
    weighted_chunks = sum(1 for chunk in chunks if len(chunk))
    if on_chunks is not None:
        on_chunks(chunks, generator)
    for c, chunk in enumerate(chunks):
        state = on_chunk(c, chunk, generator) if on_chunk is not None else None
        batches = micro_batch_positions(len(chunk), batch_size, equal_passes)
        for repeat in range(repeats):
            for index, positions in enumerate(batches):
                filler = positions is None
                batch = MicroBatch(
                    items=filler_batch if positions is None else chunk[positions],
                    positions=slice(0, 1) if positions is None else positions, index=index,
                    repeat=repeat, chunk=c, filler=filler, chunk_state=state,
                    generator=filler_generator() if filler else generator,
                )  # fmt: skip
                loss, logs = loss_fn(batch)
                share = 0.0 if filler else len(batch.items) / (len(chunk) * repeats)
                optim.backward(loss, scale=share)
                if filler:
                    continue
                for key, value in logs.items():
                    term = value.detach() if isinstance(value, Tensor) else value
                    totals[key] = totals.get(key, 0.0) + term * share / weighted_chunks
        grad_norms.append(optim.step())
    out = {f"train/{key}": value for key, value in host_floats(totals).items()}
    out["train/grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else 0.0
    return out
