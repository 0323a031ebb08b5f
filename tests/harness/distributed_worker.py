"""Run by tests/harness/test_distributed.py under ``accelerate launch`` with 2 CPU processes (gloo).

Each process writes what it saw to ``OUT/rank<r>.json``; the test compares those files with
single-process computations. Not a test module itself (no ``test_`` prefix).
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import torch

from benchmarks.shapes.benchmark import ShapesBenchmark
from harness.advantages import group_advantages, zero_std_groups
from harness.bench.sd3_check import Brightness
from harness.compute import CountingPolicy, Ledger
from harness.distributed import from_environment
from harness.evaluate import EvalSettings, evaluate_policy
from harness.optim import OptimConfig
from harness.policy import Cond
from harness.samplers import make_sampler
from harness.trainer import LoopConfig, train
from harness.types import Prompt
from methods import METHODS
from methods.base import Rollout
from methods.diffusion_nft import optimality_probability
from methods.raft import top_k_mask
from methods.rwr import group_softmax_weights
from tests.conftest import make_tiny_policy

# One iteration's batch: 3 prompts x 4 images; with 2 processes, prompt 1's images sit on both.
REWARDS = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.7, 0.2, 0.6, 0.4, 0.4, 0.4, 0.4])
GROUP_IDS = torch.arange(3).repeat_interleave(4)
FEATURES = torch.linspace(-1, 1, 36).reshape(12, 3)
TARGETS = torch.linspace(0, 2, 12)
# 6 eval images in batches of 2 with a stochastic sampler: process 0 samples batches 0 and 2, process 1
# batch 1 and a filler in the last round.
EVAL_SETTINGS = EvalSettings(num_steps=2, batch_size=2)
EVAL_BENCHMARK = partial(ShapesBenchmark, prompts_per_task=1, images_per_prompt=1)
END_TO_END = {"diffusion_nft": {"num_steps": 3}, "raft": {"num_steps": 3}, "online_dpo": {"num_steps": 3},
              "flow_grpo": {"num_steps": 3, "rollout_cfg": 1.0, "train_cfg": 1.0}}  # fmt: skip


def statistics(processes) -> dict[str, list]:
    """Per-prompt statistics of this process's share, computed from the gathered rewards."""
    share = processes.shard(len(REWARDS))
    gathered = processes.gather(REWARDS[share].clone())
    rollout = Rollout(
        [Prompt("p")] * (share.stop - share.start), GROUP_IDS[share], Cond({"c": torch.zeros(6, 1)}),
        torch.zeros(6, 1), batch_group_ids=GROUP_IDS, batch_index=torch.arange(12)[share],
    )  # fmt: skip
    ids = rollout.all_group_ids
    return {
        "gathered": gathered.tolist(),
        "grpo_advantages": rollout.mine(group_advantages(gathered, ids, std="group")).tolist(),
        "nft_r": rollout.mine(optimality_probability(gathered, ids, 5.0, "global")).tolist(),
        "raft_mask": rollout.mine(top_k_mask(gathered, ids, 1)).tolist(),
        "rwr_weights": rollout.mine(group_softmax_weights(gathered, ids, 0.1)).tolist(),
        "zero_std": rollout.mine(zero_std_groups(gathered, ids)).tolist(),
    }


def averaged_gradient(processes) -> list[float]:
    """d/dw of mean((Xw − y)²) over this process's share, averaged over the processes."""
    share = processes.shard(len(TARGETS))
    weight = torch.nn.Parameter(torch.tensor([0.5, -0.2, 0.1]))
    loss = ((FEATURES[share] @ weight - TARGETS[share]) ** 2).mean()
    loss.backward()
    processes.average_gradients([weight])
    return weight.grad.tolist()


def end_to_end(processes, name: str) -> dict[str, object]:
    """Two iterations through the shared loop; what every process must agree on."""
    policy = make_tiny_policy(seed=0)
    cfg = METHODS.get(name).Config(**END_TO_END[name])
    loop = LoopConfig(iterations=2, prompts_per_iteration=2, images_per_prompt=4, eval=EvalSettings(num_steps=2))
    bench = ShapesBenchmark(prompts_per_task=1, images_per_prompt=1)
    # A reward with signal on a random model's images (the shapes judge finds nothing there to score).
    result = train(METHODS.get(name), cfg, policy, bench, Brightness(), loop, OptimConfig(lr=1e-3), progress=False,
                   processes=processes)  # fmt: skip
    weights = torch.cat([p.detach().flatten() for p in policy.trainable_parameters()])
    return {
        "weights_sum": weights.double().sum().item(),
        "weights_abs_sum": weights.double().abs().sum().item(),
        "reward_means": [row["train/reward_mean"] for row in result.iterations],
        "fwd_equiv": [row["compute/fwd_equiv"] for row in result.iterations],
        "local_training_fwd": result.ledger.forward["training"],
        "evaluations": len(result.evaluations),
    }


def sharded_evaluation(processes) -> dict[str, object]:
    """One evaluation split over the processes; the main process reports the gathered images."""
    policy, ledger = make_tiny_policy(seed=0), Ledger()
    counted = CountingPolicy(policy, ledger)
    with ledger.phase("eval"):
        output = evaluate_policy(counted, EVAL_BENCHMARK(), make_sampler("flow_sde"), EVAL_SETTINGS, progress=False,
                                 processes=processes)  # fmt: skip
    return {
        "scores": output.scores,
        "images": None if output.images is None else output.images.tolist(),
        "forward": ledger.forward["eval"],
        "images_decoded": ledger.images["eval"],
    }


class FailingBenchmark(ShapesBenchmark):
    def evaluate(self, images, prompts):
        raise ValueError("the judge is down")


def failed_scoring(processes) -> str:
    """What each process raises when the main process cannot score an evaluation."""
    bench = FailingBenchmark(prompts_per_task=1, images_per_prompt=1)
    try:
        evaluate_policy(make_tiny_policy(seed=0), bench, make_sampler("euler"), EVAL_SETTINGS, progress=False,
                        processes=processes)  # fmt: skip
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return "nothing raised"


def main(out: Path) -> None:
    processes = from_environment()
    report = {
        "rank": processes.rank,
        "world_size": processes.world_size,
        "statistics": statistics(processes),
        "gradient": averaged_gradient(processes),
        "end_to_end": {name: end_to_end(processes, name) for name in END_TO_END},
        "seed_keys": list(processes.seed_keys),
        "evaluation": sharded_evaluation(processes),
        "failed_scoring": failed_scoring(processes),
    }
    (out / f"rank{processes.rank}.json").write_text(json.dumps(report))
    processes.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
