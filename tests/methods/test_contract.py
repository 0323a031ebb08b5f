"""Every registered method runs two iterations through the shared loop on the shapes world."""

import pytest

from benchmarks.shapes.benchmark import ShapesBenchmark
from harness.evaluate import EvalSettings
from harness.optim import OptimConfig
from harness.trainer import LoopConfig, train
from methods import METHODS
from rewards.shapes import ShapesGenEval

SMALL = {
    "diffusion_nft": {"num_steps": 3},
    "flow_grpo": {"num_steps": 3, "rollout_cfg": 2.0, "train_cfg": 2.0},
}


@pytest.mark.parametrize("name", METHODS.keys())
def test_two_iterations_through_the_loop(name, tiny_policy):
    method_cls = METHODS.get(name)
    cfg = method_cls.Config(**SMALL.get(name, {}))
    loop = LoopConfig(iterations=2, prompts_per_iteration=2, images_per_prompt=3, eval=EvalSettings(num_steps=2))
    bench = ShapesBenchmark(prompts_per_task=1, images_per_prompt=1)
    result = train(name, cfg, tiny_policy, bench, ShapesGenEval(), loop, OptimConfig(lr=1e-4), progress=False)
    assert [row["iteration"] for row in result.iterations] == [1, 2]
    assert [row["iteration"] for row in result.evaluations] == [0, 2]
    assert result.evaluations[-1]["compute/fwd_equiv"] == result.ledger.fwd_equiv > 0
    assert result.ledger.images["sampling"] == 2 * 2 * 3
    assert result.ledger.forward["eval"] == 2 * 6 * 2  # two evals × 6 images × 2 steps
