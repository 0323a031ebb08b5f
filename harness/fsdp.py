"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for policies that do not fit once per process.

Requested by an accelerate config with ``distributed_type: FSDP`` and ``fsdp_version: 2``
(``harness/launch/8gpu_fsdp.yaml``): ``accelerate launch`` then sets ``ACCELERATE_USE_FSDP`` and
``FSDP_VERSION``, which :func:`harness.distributed.from_environment` reads. The harness shards
the policy itself (the policy names its units, e.g. each transformer block, then the root) once
its weight sets exist; accelerate's ``Accelerator.prepare`` is not used, so of the ``fsdp_config``
keys only ``fsdp_version`` and ``fsdp_reshard_after_forward`` are honoured, and the options the
harness does not implement are refused (:data:`UNSUPPORTED`) rather than ignored.

What changes under FSDP, against plain data parallelism (:mod:`harness.distributed`):

* gradients are averaged by FSDP's reduce-scatter in the backward pass, so the harness's own
  all-reduce (``Processes.average_gradients``) is skipped, all but its zeros for missing gradients
  (:func:`zero_missing_gradients`); parameters, gradients, the optimizer moments and the EMA are
  DTensor shards, and their element-wise updates act on the shards;
* every forward pass all-gathers a unit's parameters, so every process must run the same passes:
  evaluation deals every process the same number of batches, and a method whose training subset
  depends on the rewards pads its micro-batches with filler passes (:mod:`harness.accumulate`);
* checkpoints hold full tensors, gathered on every process (:func:`full_tensors`) and written by
  the main one, so a checkpoint saved under FSDP loads in one process and vice versa
  (:func:`local_like` cuts a full tensor back to this process's shard).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

# Environment variables accelerate launch sets from fsdp_config → (refused value test, the key to change).
UNSUPPORTED: dict[str, tuple[Callable[[str], bool], str]] = {
    "FSDP_OFFLOAD_PARAMS": (lambda v: v.lower() == "true", "fsdp_offload_params: false"),
    "FSDP_AUTO_WRAP_POLICY": (lambda v: True, "no fsdp_auto_wrap_policy (the policy names its units)"),
    "FSDP_ACTIVATION_CHECKPOINTING": (lambda v: v.lower() == "true", "fsdp_activation_checkpointing: false"),
    "FSDP_STATE_DICT_TYPE": (lambda v: v != "FULL_STATE_DICT", "no fsdp_state_dict_type (checkpoints are full)"),
}
ShardFn = Callable[[nn.Module], Any]
T = TypeVar("T")


@runtime_checkable
class ShardablePolicy(Protocol):
    """A policy that can shard its weight sets: ``shard(module)`` per unit, inner units first, the root last."""

    def trainable_parameters(self) -> list[nn.Parameter]: ...
    def fully_shard(self, shard: ShardFn) -> None: ...


def requested() -> tuple[bool, bool]:
    """(FSDP requested, reshard after forward), from the environment ``accelerate launch`` sets."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("1", "true"):
        return False, True
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(f"FSDP_VERSION={version}: only FSDP2 (fully_shard) is supported; set fsdp_version: 2")
    for name, (refused, fix) in UNSUPPORTED.items():
        value = os.environ.get(name)
        if value is not None and refused(value):
            raise ValueError(f"{name}={value} (from the accelerate config) is not supported by the harness's FSDP; "
                             f"use {fix}")  # fmt: skip
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    if reshard not in ("true", "false"):
        raise ValueError(f"fsdp_reshard_after_forward must be true or false with FSDP2, got {reshard!r}")
    return True, reshard == "true"


def shard_policy(policy: object, device: torch.device, world_size: int, reshard_after_forward: bool) -> None:
    """Shard every weight set of ``policy`` over the ``world_size`` processes (1-D mesh on ``device``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not isinstance(policy, ShardablePolicy):
        raise TypeError(f"{type(policy).__name__} cannot be sharded with FSDP (no fully_shard method); launch "
                        "it data-parallel (harness/launch/8gpu.yaml) instead")  # fmt: skip
    where = {p.device.type for p in policy.trainable_parameters()}
    if where != {device.type}:
        raise ValueError(
            f"{type(policy).__name__}'s parameters are on {sorted(where)} but this launch communicates on "
            f"{device.type!r}; FSDP gathers shards there, so the policy must live on it (the tiny DiT trains on the "
            "CPU: launch with ACCELERATE_USE_CPU=1 for gloo, or data-parallel with harness/launch/8gpu.yaml)"
        )
    mesh = init_device_mesh(device.type, (world_size,))
    policy.fully_shard(lambda module: fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward))


def zero_missing_gradients(parameters: Sequence[nn.Parameter]) -> None:
    """Give each parameter without a gradient a zero one (a shard of zeros under FSDP), before the step.

    FSDP's backward averages the gradients, so no all-reduce is left to do; but where no process ran a
    backward pass before a step (every process's chunk was empty: the padded optimizer steps of
    :func:`harness.accumulate.optimizer_chunks`), the gradients are ``None`` and AdamW would skip the
    parameters, while the data-parallel path (:meth:`harness.distributed.Processes.average_gradients`) counts a
    missing gradient as 0 and steps (the moments decay, the weight decay applies). This makes both paths take
    the same step.
    """
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor of a DTensor shard (a collective: every process must call it); others unchanged."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_tensors(tree: T) -> T:
    """``tree`` (dicts, lists, tuples) with every DTensor gathered to a full tensor, in a fixed order."""
    if isinstance(tree, Tensor):
        return full_tensor(tree).detach().clone() if isinstance(tree, DTensor) else tree  # type: ignore[return-value]
    if isinstance(tree, dict):
        return {k: full_tensors(v) for k, v in tree.items()}  # type: ignore[return-value]
    if isinstance(tree, list | tuple):
        return type(tree)(full_tensors(v) for v in tree)  # type: ignore[return-value]
    return tree


def local_like(tensor: Tensor, like: Tensor) -> Tensor:
    """A full ``tensor`` cut to this process's shard of ``like`` (no communication); unchanged if ``like`` is not sharded."""
    if not isinstance(like, DTensor):
        return tensor
    full = tensor.to(like.device, like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def local_state(state: dict[str, Tensor], like: dict[str, Tensor]) -> dict[str, Tensor]:
    """:func:`local_like` for every entry of a state dict, keyed as ``like``."""
    return {k: local_like(v, like[k]) if k in like else v for k, v in state.items()}


def local_optimizer_state(state: dict[str, Any], parameters: Sequence[nn.Parameter]) -> dict[str, Any]:
    """A full optimizer ``state_dict`` with each parameter-shaped moment cut to the parameter's shard."""
    per_param: dict[Any, Any] = {}
    for index, values in state["state"].items():
        param = parameters[int(index)]
        per_param[index] = {
            k: local_like(v, param) if isinstance(v, Tensor) and v.shape == param.shape else v
            for k, v in values.items()
        }
    return {**state, "state": per_param}
