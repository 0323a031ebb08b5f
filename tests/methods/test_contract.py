"""Contract tests over every registered method: a new registry line is tested with no new test code."""

import dataclasses
import inspect

import pytest

from benchmarks.shapes.benchmark import ShapesBenchmark
from harness.budget import Budget
from harness.evaluate import EvalSettings
from harness.optim import OptimConfig
from harness.trainer import LoopConfig, train
from methods import METHODS
from methods.base import Capabilities
from rewards.shapes import ShapesGenEval
from tests.methods.forward_smoke import Redness


def small_config(method_cls, **overrides):
    """The method's default config with ``num_steps`` cut to 4 where its own checks allow it (else the default)."""
    fields = {f.name for f in dataclasses.fields(method_cls.Config)}
    small = {"num_steps": 4} if "num_steps" in fields else {}
    try:
        return method_cls.Config(**small, **overrides)
    except ValueError:
        return method_cls.Config(**overrides)


def training_reward(method_cls):
    return Redness() if method_cls.capabilities.needs_differentiable_reward else ShapesGenEval()


@pytest.mark.parametrize("name", METHODS.keys())
def test_declares_its_contract(name):
    method_cls = METHODS.get(name)
    assert isinstance(method_cls.capabilities, Capabilities)
    config = method_cls.Config
    assert dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen
    assert "__post_init__" in vars(config), f"{config.__name__} must validate its values in __post_init__"
    fields = {f.name for f in dataclasses.fields(config)}
    declared = set(method_cls.capabilities.guidance_fields) | {method_cls.capabilities.sampler_field} - {None}
    assert declared <= fields, declared - fields
    # every field that sets a CFG scale is declared, whatever its name (FLUX checks read the declaration)
    assert {f for f in fields if "cfg" in f or "guidance" in f} <= set(method_cls.capabilities.guidance_fields)
    for hook in ("collect", "update"):
        assert list(inspect.signature(getattr(method_cls, hook)).parameters)[1:] == (
            ["prompts", "group_ids", "generator"] if hook == "collect" else ["rollout", "rewards", "generator"]
        )


@pytest.mark.parametrize("name", METHODS.keys())
def test_two_iterations_through_the_loop(name, tiny_policy):
    method_cls = METHODS.get(name)
    loop = LoopConfig(iterations=2, prompts_per_iteration=2, images_per_prompt=3, eval=EvalSettings(num_steps=2))
    bench = ShapesBenchmark(prompts_per_task=1, images_per_prompt=1)
    result = train(method_cls, small_config(method_cls), tiny_policy, bench, training_reward(method_cls), loop,
                   OptimConfig(lr=1e-4), progress=False)  # fmt: skip
    assert [row["iteration"] for row in result.iterations] == [1, 2]
    assert [row["iteration"] for row in result.evaluations] == [0, 2]
    assert result.evaluations[-1]["compute/fwd_equiv"] == result.ledger.fwd_equiv > 0
    assert result.ledger.images["sampling"] == 2 * 2 * 3
    assert result.ledger.forward["eval"] == 2 * 6 * 2  # two evals × 6 images × 2 steps
    assert all(value == value for row in result.iterations for value in row.values()), "a NaN log"


def test_budget_stops_every_method_at_the_same_compute(tiny_policy):
    loop = LoopConfig(
        iterations=50,
        budget=Budget(unit="fwd_equiv", amount=300),
        prompts_per_iteration=2,
        images_per_prompt=3,
        evaluate=False,
    )
    bench = ShapesBenchmark(prompts_per_task=1, images_per_prompt=1)
    method_cls = METHODS.get("diffusion_nft")
    result = train(method_cls, method_cls.Config(num_steps=3), tiny_policy, bench, ShapesGenEval(), loop,
                   OptimConfig(lr=1e-4), progress=False)  # fmt: skip
    per_iteration = 6 * 3 + 6 * 2 * (3 + 2)  # sampling 6×3; training 6 samples × 2 steps × (3 fwd + 2·1 bwd)
    assert per_iteration == 78
    assert result.ledger.fwd_equiv == per_iteration * 4  # 234 < 300 after three; stops after the fourth
    assert len(result.iterations) == 4 and result.evaluations == []
