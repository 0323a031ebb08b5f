"""Everything a resumed training run needs, saved atomically in one file.

θ and θ_old (through :class:`~harness.policy.ResumablePolicy`), the optimizer moments, the EMA,
the step counter, the compute ledger, the training-prompt generator's state, torch's global RNG
state, any method or reward (running normaliser) state, and the loop's own state and logs. Every other
random draw of the loop is a pure function of ``(seed, role, iteration)``, so a resumed run reproduces
an uninterrupted one on the CPU. A fingerprint of the run's configuration guards against resuming another run.
Under FSDP (:mod:`harness.fsdp`) the file holds full tensors, gathered on every process, so it loads into
a single-process run and back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.atomic import atomic_write
from harness.compute import Ledger
from harness.fsdp import full_tensors, local_state
from harness.optim import Optimization
from harness.policy import Policy, ResumablePolicy


@dataclass
class LoopState:
    """Where a run is: the last finished iteration, the next budget eval point, its logs so far."""

    iteration: int = 0
    next_eval_point: int = 0
    elapsed: float = 0.0  # wall seconds of earlier sessions of this run (evaluation included)
    iterations: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)


CHECKPOINT_FORMAT = 1


def save_checkpoint(
    path: Path, state: LoopState, policy: Policy, optim: Optimization, ledger: Ledger,
    prompt_rng: np.random.Generator, method: Any, fingerprint: str, reward: Any = None, write: bool = True,
) -> None:  # fmt: skip
    """Write everything a resumed run needs, atomically (a kill leaves the previous checkpoint).

    Under FSDP every process calls this (gathering the shards is a collective) and only the one
    with ``write`` writes.
    """
    if not isinstance(policy, ResumablePolicy):
        raise TypeError(f"{type(policy).__name__} cannot be checkpointed: it lacks weight_state/load_weight_state")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "state": asdict(state),
        "weights": full_tensors({which: policy.weight_state(which) for which in ("train", "old")}),
        "optim": full_tensors(optim.state_dict()),
        "ledger": ledger.state_dict(),
        "prompt_rng": prompt_rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "method": method.state_dict() if hasattr(method, "state_dict") else None,
        "reward": reward.state_dict() if hasattr(reward, "state_dict") else None,  # e.g. running normalizers
    }
    if write:
        atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(
    path: Path, policy: Policy, optim: Optimization, ledger: Ledger, prompt_rng: np.random.Generator, method: Any,
    fingerprint: str, reward: Any = None,
) -> LoopState:  # fmt: skip
    """Restore a run saved by :func:`save_checkpoint` into freshly built objects; returns its loop state."""
    # Our own file, holding numpy RNG state (plain Python objects): weights_only would refuse it.
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"{path} has checkpoint format {payload.get('format')}, expected {CHECKPOINT_FORMAT}")
    if payload["fingerprint"] != fingerprint:
        raise RuntimeError(
            f"{path} was written by a run with another configuration (fingerprint {payload['fingerprint'][:12]} "
            f"vs {fingerprint[:12]}); delete it, or write this run to another folder"
        )
    if not isinstance(policy, ResumablePolicy):
        raise TypeError(f"{type(policy).__name__} cannot be resumed: it lacks weight_state/load_weight_state")
    for which, weights in payload["weights"].items():
        policy.load_weight_state(which, local_state(weights, policy.weight_state(which)))  # shards under FSDP
    optim.load_state_dict(payload["optim"])
    ledger.load_state_dict(payload["ledger"])
    prompt_rng.bit_generator.state = payload["prompt_rng"]
    torch.set_rng_state(payload["torch_rng"])
    if payload["method"] is not None:
        method.load_state_dict(payload["method"])
    if payload["reward"] is not None:
        reward.load_state_dict(payload["reward"])
    return LoopState(**payload["state"])
