"""The one inner update loop: the per-sample loss-scaling rule, chunks, fillers, hooks and logs."""

import pytest
import torch
from torch import nn

from harness.accumulate import MicroBatch, accumulate, optimizer_chunks
from harness.optim import OptimConfig, Optimization


class Recorder:
    """An optimizer stand-in that records each step's accumulated gradient and each backward's scale."""

    def __init__(self, parameter: nn.Parameter) -> None:
        self.parameter, self.scales, self.steps = parameter, [], []

    def backward(self, loss: torch.Tensor, scale: float = 1.0) -> None:
        self.scales.append(scale)
        (loss * scale).backward()

    def step(self) -> float:
        self.steps.append(self.parameter.grad.clone())
        self.parameter.grad = None
        return float(len(self.steps))


def quadratic_loss(parameter: nn.Parameter, targets: torch.Tensor):
    """Loss of a micro-batch: the mean over its items (and repeat r) of (θ − target_i − r)²."""

    def loss_fn(batch: MicroBatch):
        values = (parameter - targets[batch.items] - batch.repeat) ** 2
        return values.mean(), {"value": values.detach().mean()}

    return loss_fn


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 7])
def test_every_item_and_repeat_weighs_the_same_whatever_the_split(batch_size):
    parameter, targets = nn.Parameter(torch.tensor(0.5)), torch.arange(7.0)
    optim = Recorder(parameter)
    logs = accumulate(optim, torch.arange(7), quadratic_loss(parameter, targets), generator=torch.Generator(),
                      optimizer_steps=1, batch_size=batch_size, repeats=2)  # fmt: skip
    pairs = torch.stack([targets + r for r in (0, 1)])  # the plain mean over every (item, repeat)
    assert optim.steps[0].item() == pytest.approx((2 * (0.5 - pairs)).mean().item(), rel=1e-6)
    assert logs["train/value"] == pytest.approx(((0.5 - pairs) ** 2).mean().item(), rel=1e-6)
    assert sum(optim.scales) == pytest.approx(1.0)


def test_one_step_keeps_order_and_draws_nothing_several_steps_shuffle():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert [c.tolist() for c in optimizer_chunks(torch.arange(5), 1, g)] == [[0, 1, 2, 3, 4]]
    assert torch.equal(g.get_state(), state)
    chunks = optimizer_chunks(torch.arange(5), 2, g)
    assert [len(c) for c in chunks] == [3, 2] and sorted(torch.cat(chunks).tolist()) == [0, 1, 2, 3, 4]


def test_steps_hooks_and_logs_average_over_steps():
    parameter = nn.Parameter(torch.tensor(0.0))
    optim = Recorder(parameter)
    seen, states = [], []

    def loss_fn(batch: MicroBatch):
        seen.append((batch.chunk, batch.index, batch.repeat, batch.items.tolist(), batch.chunk_state))
        return (parameter * 0 + batch.chunk).sum(), {"chunk": float(batch.chunk)}

    logs = accumulate(optim, torch.arange(4), loss_fn, generator=torch.Generator().manual_seed(1), optimizer_steps=2,
                      batch_size=1, repeats=1, on_chunks=lambda chunks, g: states.append(len(chunks)),
                      on_chunk=lambda c, chunk, g: f"state{c}")  # fmt: skip
    assert states == [2] and len(optim.steps) == 2
    assert [s[4] for s in seen] == ["state0"] * 2 + ["state1"] * 2
    assert [s[1] for s in seen] == [0, 1, 0, 1]
    assert logs["train/chunk"] == pytest.approx(0.5)  # one real step with 0, one with 1
    assert logs["train/grad_norm"] == pytest.approx(1.5)  # the mean of the recorder's 1 and 2


def test_fillers_run_with_zero_weight_and_their_own_draws():
    parameter = nn.Parameter(torch.tensor(1.0))
    optim = Recorder(parameter)
    generators = []

    def loss_fn(batch: MicroBatch):
        generators.append((batch.filler, batch.generator))
        return (parameter**2) * (100.0 if batch.filler else 1.0), {"n": float(len(batch.items))}

    update_generator = torch.Generator()
    logs = accumulate(optim, torch.arange(2), loss_fn, generator=update_generator, optimizer_steps=1, batch_size=1,
                      equal_passes=lambda n: n + 2)  # two more passes than this process has  # fmt: skip
    assert [f for f, _ in generators] == [False, False, True, True]
    assert optim.scales == [0.5, 0.5, 0.0, 0.0]
    assert optim.steps[0].item() == pytest.approx(2.0)  # d(θ²)/dθ at 1, fillers contribute nothing
    assert all(g is update_generator for f, g in generators if not f)
    assert all(g is not update_generator for f, g in generators if f)
    assert logs["train/n"] == 1.0  # fillers are not logged


def test_the_optimizer_refuses_a_non_finite_loss():
    parameter = nn.Parameter(torch.tensor(1.0))
    optim = Optimization([parameter], OptimConfig(lr=1e-3))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        accumulate(optim, torch.arange(2), lambda b: (parameter * float("nan"), {}), generator=torch.Generator(),
                   optimizer_steps=1, batch_size=2)  # fmt: skip
