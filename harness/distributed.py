"""Data parallelism over the processes that ``accelerate launch`` (or ``torchrun``) starts.

The contract, FlowGRPO's and DiffusionNFT's batch geometry with a process count that does not
change it: every process draws the same P training prompts (one seeded prompt stream), the
P·G samples of an iteration are dealt out in contiguous, equal shares, and each process samples
its share with its own seed. Rewards are scored where the images are, then gathered with the
group ids, so per-prompt statistics (advantages, top-k, softmax weights) are computed over the
whole group wherever its images were made; each process then trains on its own samples.
Before every optimizer step the gradients are averaged over the processes, which is DDP's
all-reduce mean, done once per step on the trainable parameters rather than in buckets during
the backward pass: it works with any forward pattern (three weight sets, reference passes
without gradient) and the LoRA / tiny-model parameter sets are small. Every process then holds
the same weights, so checkpoints are the main process's job. Evaluation is sharded: every process
samples and decodes a round-robin share of the eval batches, the images are gathered on the main
process, which scores them and shares the scores (:mod:`harness.evaluate`). Under FSDP
(:mod:`harness.fsdp`) each process holds shards instead, FSDP averages the gradients, and every
process gathers checkpoints.

With one process every function here is the identity and nothing is imported from accelerate.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place among the data-parallel processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where collectives run (cuda for nccl)
    fsdp: bool = False  # shard the policy with FSDP2 (accelerate config distributed_type: FSDP)
    reshard_after_forward: bool = True  # FSDP2's option: free gathered parameters after each forward

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def seed_keys(self) -> tuple[str, ...]:
        """Extra keys for per-process random streams (none with one process, so results match a plain run)."""
        return () if self.world_size == 1 else (f"rank{self.rank}",)

    def shard(self, n: int, what: str = "samples") -> slice:
        """This process's contiguous share of ``n`` items; ``n`` must divide evenly."""
        if n % self.world_size:
            raise ValueError(
                f"{n} {what} per iteration cannot be split evenly over {self.world_size} processes; make "
                f"prompts_per_iteration × images_per_prompt a multiple of the number of processes"
            )
        size = n // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def gather(self, tensor: Tensor) -> Tensor:
        """Every process's ``tensor`` (same shape on each) concatenated along dim 0, in rank order."""
        if self.world_size == 1:
            return tensor
        local = tensor.detach().to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    def gather_on_main(self, tensor: Tensor) -> list[Tensor] | None:
        """Every process's ``tensor`` on the main process, in rank order (None elsewhere).

        Sizes along dim 0 may differ between processes (the other dims may not): each is padded to the
        largest for the collective and cut back on the main process, which receives them on the CPU.
        """
        if self.world_size == 1:
            return [tensor]
        local = tensor.detach().to(self.device).contiguous()
        sizes = [int(n) for n in self.gather(torch.tensor([local.shape[0]], device=self.device)).tolist()]
        padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)] if self.is_main else None
        torch.distributed.gather(padded, parts, dst=0)
        if parts is None:
            return None
        return [part[:n].cpu() for part, n in zip(parts, sizes, strict=True)]

    def broadcast_from_main(self, value: T) -> T:
        """The main process's ``value`` (any picklable object) on every process."""
        if self.world_size == 1:
            return value
        box: list[T | None] = [value if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return typing.cast(T, box[0])  # every process now holds the main one's value

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums of ``values`` over the processes."""
        if self.world_size == 1:
            return list(values)
        total = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return total.tolist()

    def max(self, values: Sequence[float]) -> list[float]:
        """Element-wise maxima of ``values`` over the processes."""
        if self.world_size == 1:
            return list(values)
        total = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX)
        return total.tolist()

    def average_gradients(self, parameters: Sequence[nn.Parameter]) -> None:
        """Replace each parameter's gradient by its mean over the processes (a missing gradient counts as 0)."""
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device, torch.float32)
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(parameters, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.device, g.dtype)
            offset += g.numel()

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Wait for every process, then tear the process group down (a process that exits with the group
        alive can abort in the communication threads while another still finishes its last collective)."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


SINGLE = Processes()


def from_environment() -> Processes:
    """The processes of this launch: :data:`SINGLE` unless ``WORLD_SIZE`` > 1 (accelerate launch, torchrun).

    The process group is set up by accelerate's ``PartialState``: NCCL where CUDA is available,
    gloo on the CPU (``ACCELERATE_USE_CPU=1`` forces the CPU). An FSDP accelerate config sets
    ``fsdp`` (:func:`harness.fsdp.requested`); with one process there is nothing to shard.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    from accelerate import PartialState

    from harness.fsdp import requested

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    device = torch.device("cpu") if cpu else torch.device("cuda", state.local_process_index)
    fsdp, reshard = requested()
    return Processes(state.process_index, state.num_processes, device, fsdp=fsdp, reshard_after_forward=reshard)
