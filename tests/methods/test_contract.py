"""Every registered method runs two iterations through the shared loop on the shapes world."""

import pytest

from benchmarks.shapes.benchmark import ShapesBenchmark
from harness.budget import Budget
from harness.evaluate import EvalSettings
from harness.optim import OptimConfig
from harness.trainer import LoopConfig, train
from methods import METHODS
from rewards.shapes import ShapesGenEval
from tests.methods.forward_smoke import Redness

SMALL = {
    "diffusion_nft": {"num_steps": 3},
    "flow_grpo": {"num_steps": 3, "rollout_cfg": 2.0, "train_cfg": 2.0},
    "raft": {"num_steps": 3},
    "rwr": {"num_steps": 3},
    "online_dpo": {"num_steps": 3, "guidance_scale": 2.0, "ref_update_step": 1},
    "awm": {"num_steps": 3, "train_timesteps": 2},
    "flow_grpo_fast": {"num_steps": 4, "sde_window_size": 2, "sde_window_range": (0, 3)},
    "draft": {"num_steps": 3},
}


@pytest.mark.parametrize("name", METHODS.keys())
def test_two_iterations_through_the_loop(name, tiny_policy):
    method_cls = METHODS.get(name)
    cfg = method_cls.Config(**SMALL.get(name, {}))
    loop = LoopConfig(iterations=2, prompts_per_iteration=2, images_per_prompt=3, eval=EvalSettings(num_steps=2))
    bench = ShapesBenchmark(prompts_per_task=1, images_per_prompt=1)
    reward = Redness() if getattr(method_cls, "needs_differentiable_reward", False) else ShapesGenEval()
    result = train(name, cfg, tiny_policy, bench, reward, loop, OptimConfig(lr=1e-4), progress=False)
    assert [row["iteration"] for row in result.iterations] == [1, 2]
    assert [row["iteration"] for row in result.evaluations] == [0, 2]
    assert result.evaluations[-1]["compute/fwd_equiv"] == result.ledger.fwd_equiv > 0
    assert result.ledger.images["sampling"] == 2 * 2 * 3
    assert result.ledger.forward["eval"] == 2 * 6 * 2  # two evals × 6 images × 2 steps


def test_budget_stops_every_method_at_the_same_compute(tiny_policy):
    loop = LoopConfig(
        iterations=50,
        budget=Budget(unit="fwd_equiv", amount=300),
        prompts_per_iteration=2,
        images_per_prompt=3,
        evaluate=False,
    )
    bench = ShapesBenchmark(prompts_per_task=1, images_per_prompt=1)
    cfg = METHODS.get("diffusion_nft").Config(num_steps=3)
    result = train(
        "diffusion_nft", cfg, tiny_policy, bench, ShapesGenEval(), loop, OptimConfig(lr=1e-4), progress=False
    )
    per_iteration = 6 * 3 + 6 * 2 * (3 + 2)  # sampling 6×3; training 6 samples × 2 steps × (3 fwd + 2·1 bwd)
    assert per_iteration == 78
    assert result.ledger.fwd_equiv == per_iteration * 4  # 234 < 300 after three; stops after the fourth
    assert len(result.iterations) == 4 and result.evaluations == []
