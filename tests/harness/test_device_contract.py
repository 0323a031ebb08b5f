"""The device contract: one training iteration of every method, and an evaluation, read nothing back to the host
per sampling step or micro-batch (harness/policy.py, docs/architecture.md "Devices").

:class:`HostReads` counts what would make a GPU wait for the host: scalar reads (``.item()``, ``float()``,
``int()``, ``bool()`` and ``if`` on a tensor all reach ``aten._local_scalar_dense``), ``.tolist()``,
``.cpu()`` and ``.numpy()``, operations whose output size depends on the data (``nonzero``, ``unique``, boolean
indexing, ``repeat_interleave`` without ``output_size``), ``torch.equal`` and, on a GPU, blocking copies
between devices. Host values are not counted when read: draws from the seeded CPU generators (a window's start,
a chunk's seeds), tensors made from Python data, copies brought to the host by ``.cpu()``, whatever is computed
from these alone, and AdamW's step counters (torch keeps them on the CPU). The counts of one iteration must not
grow with the sampling steps or the micro-batches.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.shapes.benchmark import ShapesBenchmark
from harness import trainer
from harness.evaluate import EvalSettings, evaluate_policy
from harness.optim import OptimConfig
from harness.samplers import make_sampler
from harness.trainer import LoopConfig, train
from harness.types import Prompt, RewardSpec
from methods import METHODS
from tests.conftest import make_tiny_policy

aten = torch.ops.aten
SCALAR_READS = {aten._local_scalar_dense.default: "item", aten.equal.default: "equal"}
SIZED_BY_DATA = {aten.nonzero.default: "nonzero", aten._unique2.default: "unique", aten.unique_dim.default: "unique",
                 aten.unique_consecutive.default: "unique", aten.masked_select.default: "masked_select"}  # fmt: skip
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
COPIES = {aten._to_copy.default, aten.copy_.default}
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                  reason="needs CUDA")])]  # fmt: skip


class HostReads(TorchDispatchMode):
    """Counts, by kind, every operation that reads device data back to the host (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._host: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
        self._paused = False

    def _is_host(self, tensor: Tensor) -> bool:
        return self._host.get(id(tensor)) is tensor

    def _mark_host(self, out: Any) -> None:
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, Tensor):
                self._host[id(tensor)] = tensor

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        made_on_host = kwargs.get("generator") is not None or func in (
            aten.lift_fresh.default,
            aten.lift_fresh_copy.default,
        )
        if made_on_host or (inputs and all(self._is_host(t) for t in inputs)):
            self._mark_host(out)
            return out
        kind = self._kind(func, args, kwargs, inputs)
        if kind is not None and not self._paused:
            self.counts[kind] += 1
        return out

    @staticmethod
    def _kind(func: Any, args: tuple, kwargs: dict, inputs: list[Tensor]) -> str | None:
        if func in SCALAR_READS or func in SIZED_BY_DATA:
            return SCALAR_READS.get(func) or SIZED_BY_DATA[func]
        if func == aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            return "repeat_interleave"
        indices = [t for t in pytree.tree_leaves(args[1:2]) if isinstance(t, Tensor)] if func in INDEXING else []
        if any(t.dtype == torch.bool for t in indices):
            return "bool_index"
        if func in COPIES and not kwargs.get("non_blocking", False):
            target = kwargs.get("device") if func == aten._to_copy.default else args[0].device
            if target is not None and len({torch.device(target).type, *(t.device.type for t in inputs)}) > 1:
                return "blocking_copy"
        return None

    def _patched(self, owner: type, name: str, count: bool = True) -> Callable[..., Any]:
        original = getattr(owner, name)

        def read(obj: Any, *args: Any, **kwargs: Any) -> Any:
            if count and not self._paused and not self._is_host(obj):
                self.counts[name] += 1
            paused, self._paused = self._paused, True  # what it runs is counted as this one read
            try:
                out = original(obj, *args, **kwargs)
            finally:
                self._paused = paused
            if name == "cpu":  # a distinct host copy (on the CPU, .cpu() returns the tensor itself)
                out = out.clone()
                self._mark_host(out)
            return out

        return read

    @contextmanager
    def recording(self) -> Iterator[HostReads]:
        reads = {name: self._patched(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}
        with (
            self,
            mock.patch.multiple(torch.Tensor, **reads),
            mock.patch.object(torch.optim.AdamW, "step", self._patched(torch.optim.AdamW, "step", count=False)),
        ):
            yield self


class ScoresByPosition:
    """Scores fixed by a sample's place in its group of 4 (0, 1, 1/2, 1/3), plus 0·image for a gradient: every
    geometry takes the same reward-dependent branches (filters, pairs, top-k), and DRaFT can backpropagate."""

    spec = RewardSpec(name="by_position", version="test", description="1/(place in group)", value_range=(0.0, 1.0),
                      differentiable=True)  # fmt: skip

    def __call__(self, images: Tensor, prompts: list[Prompt]) -> Tensor:
        place = torch.arange(images.shape[0], device=images.device) % 4
        return (place > 0) / place.clamp(min=1) + 0.0 * images.mean(dim=(1, 2, 3))


PROMPTS, GROUP = 2, 4
UNITS = {"crd": PROMPTS, "dgpo": PROMPTS, "online_dpo": PROMPTS}  # what a micro-batch counts (groups, pairs)
SMALL = {"train_timesteps": 2, "trunc_steps": 2, "sde_window_range": (0, 2), "sde_window_size": 1}  # fewer passes


def geometry(name: str, steps: int, micro_batches: int) -> Any:
    """The method's config with ``steps`` sampling steps and its items in ``micro_batches`` micro-batches of one
    optimizer step (and, to stay fast, few training times where a method fixes their number)."""
    method_cls = METHODS.get(name)
    fields = {f.name for f in dataclasses.fields(method_cls.Config)}
    overrides = {"num_steps": steps, "train_batch_size": UNITS.get(name, PROMPTS * GROUP) // micro_batches,
                 "optimizer_steps_per_iteration": 1, **SMALL}  # fmt: skip
    return method_cls.Config(**{k: v for k, v in overrides.items() if k in fields})


def iteration_reads(name: str, steps: int, micro_batches: int, device: str) -> Counter[str]:
    """The host reads of the first training iteration (collect, decode, reward, update, logs)."""
    recorded: list[Counter[str]] = []
    iterate = trainer._Run.iterate

    def recorded_iterate(run: Any, *args: Any) -> dict[str, Any]:
        with HostReads().recording() as reads:
            row = iterate(run, *args)
        recorded.append(reads.counts)
        return row

    loop = LoopConfig(iterations=1, prompts_per_iteration=PROMPTS, images_per_prompt=GROUP, evaluate=False)
    bench = ShapesBenchmark(prompts_per_task=1, images_per_prompt=1)
    with mock.patch.object(trainer._Run, "iterate", recorded_iterate):
        train(METHODS.get(name), geometry(name, steps, micro_batches), make_tiny_policy().to(device), bench,
              ScoresByPosition(), loop, OptimConfig(lr=1e-4), progress=False)  # fmt: skip
    return recorded[0]


# Host reads per iteration, whatever the geometry: 5 (RWR, online DPO, DRaFT) to 14 (GRPO-Guard: the reward check,
# the advantages' group statistics, FlowGRPO's filter, its logs, the update's logs and the optimizer step).
BOUND = 16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", METHODS.keys())
def test_an_iteration_reads_back_the_same_few_values_whatever_its_steps_and_micro_batches(name, device):
    base = iteration_reads(name, 3, 1, device)
    assert iteration_reads(name, 6, 1, device) == base, "host reads grow with the sampling steps"
    assert iteration_reads(name, 3, 2, device) == base, "host reads grow with the micro-batches"
    assert sum(base.values()) <= BOUND, dict(base)
    assert base["blocking_copy"] == 0, dict(base)


def eval_reads(steps: int, sampler: str, device: str) -> Counter[str]:
    policy = make_tiny_policy().to(device)
    benchmark = ShapesBenchmark(prompts_per_task=1, images_per_prompt=2)
    with HostReads().recording() as reads:
        evaluate_policy(policy, benchmark, make_sampler(sampler), EvalSettings(num_steps=steps, batch_size=4),
                        progress=False)  # fmt: skip
    return reads.counts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", ["euler", "dpm2", "flow_sde"])
def test_an_evaluation_reads_back_the_same_values_whatever_its_steps(sampler, device):
    assert eval_reads(2, sampler, device) == eval_reads(5, sampler, device)


def test_the_counter_sees_reads_and_ignores_cpu_draws():
    x, generator = torch.ones(3), torch.Generator().manual_seed(0)
    with HostReads().recording() as reads:
        read = [float(x.sum()), bool((x > 0).all()), x.tolist(), x.cpu(), x[x > 0], x.nonzero()]
        drawn = [int(torch.randint(0, 5, (1,), generator=generator)), torch.randperm(4, generator=generator).tolist()]
    assert reads.counts == Counter(item=2, tolist=1, cpu=1, bool_index=1, nonzero=1)
    assert len(read) == 6 and drawn[0] in range(5) and sorted(drawn[1]) == [0, 1, 2, 3]
