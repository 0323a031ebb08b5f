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
the same weights, so evaluation and checkpoints are the main process's job. Under FSDP
(:mod:`harness.fsdp`) each process holds shards instead, FSDP averages the gradients, and every
process evaluates and gathers checkpoints.

With one process every function here is the identity and nothing is imported from accelerate.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


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
    def evaluates(self) -> bool:
        """Whether this process runs evaluations: the main one, or every one under FSDP (forwards gather shards)."""
        return self.is_main or self.fsdp

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
