"""Data parallelism: two gloo CPU processes under ``accelerate launch`` agree with one process."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness.accumulate import optimizer_chunks
from harness.advantages import group_advantages, zero_std_groups
from harness.compute import CountingPolicy, Ledger
from harness.distributed import SINGLE, Processes
from harness.evaluate import evaluate_policy
from harness.optim import OptimConfig
from harness.policy import Cond
from harness.samplers import make_sampler
from harness.store import read_results
from harness.trainer import LoopConfig, check_geometry, train
from harness.types import Prompt
from methods import METHODS
from methods.base import Rollout
from methods.diffusion_nft import DiffusionNFT, DiffusionNFTConfig, optimality_probability
from methods.raft import top_k_mask
from methods.rwr import group_softmax_weights
from rewards.base import WeightedReward
from rewards.normalize import RunningMeanStd
from rewards.shapes import ShapesGenEval
from tests.conftest import make_tiny_policy
from tests.harness import distributed_worker as worker

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(*module_and_args: str) -> subprocess.CompletedProcess[str]:
    """``accelerate launch`` with 2 gloo CPU processes running ``python -m MODULE ARGS``."""
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "--module", *module_and_args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def two_process_reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("distributed")
    launch_two_processes("tests.harness.distributed_worker", str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_gathered_rewards_and_per_prompt_statistics_equal_one_process(two_process_reports):
    rewards, ids = worker.REWARDS, worker.GROUP_IDS
    single = {
        "grpo_advantages": group_advantages(rewards, ids, std="group"),
        "nft_r": optimality_probability(rewards, ids, 5.0, "global"),
        "raft_mask": top_k_mask(rewards, ids, 1),
        "rwr_weights": group_softmax_weights(rewards, ids, 0.1),
        "zero_std": zero_std_groups(rewards, ids),
    }
    first, second = (report["statistics"] for report in two_process_reports)
    assert [r["world_size"] for r in two_process_reports] == [2, 2]
    assert first["gathered"] == second["gathered"] == pytest.approx(rewards.tolist())
    for key, expected in single.items():  # prompt 1's four images were split 2 + 2 over the processes
        both = first[key] + second[key]
        if expected.dtype == torch.bool:
            assert both == expected.tolist(), key
        else:
            assert both == pytest.approx(expected.tolist(), rel=1e-6, abs=1e-7), key


def test_averaged_gradients_equal_the_whole_batch_gradient(two_process_reports):
    weight = torch.nn.Parameter(torch.tensor([0.5, -0.2, 0.1]))
    ((worker.FEATURES @ weight - worker.TARGETS) ** 2).mean().backward()
    for report in two_process_reports:
        assert report["gradient"] == pytest.approx(weight.grad.tolist(), rel=1e-6)


def test_training_keeps_the_processes_in_step(two_process_reports, tiny_policy):
    first, second = (report["end_to_end"] for report in two_process_reports)
    for name in worker.END_TO_END:
        a, b = first[name], second[name]
        assert a["weights_sum"] == b["weights_sum"] and a["weights_abs_sum"] == b["weights_abs_sum"], name
        assert a["reward_means"] == b["reward_means"] and a["fwd_equiv"] == b["fwd_equiv"], name
        assert (a["evaluations"], b["evaluations"]) == (2, 0), name  # all sample, the main process records
    assert [r["seed_keys"] for r in two_process_reports] == [["rank0"], ["rank1"]]
    # A group's statistics can leave one process nothing to train (FlowGRPO drops zero-std groups): it
    # still joins every optimizer step, or the other would wait forever. The counters are summed.
    assert first["flow_grpo"]["local_training_fwd"] + second["flow_grpo"]["local_training_fwd"] > 0
    # DiffusionNFT's compute does not depend on the data: the summed counters equal one process's.
    loop = LoopConfig(iterations=2, prompts_per_iteration=2, images_per_prompt=4, evaluate=False)
    bench = worker.ShapesBenchmark(prompts_per_task=1, images_per_prompt=1)
    alone = train(DiffusionNFT, DiffusionNFTConfig(num_steps=3), tiny_policy, bench, ShapesGenEval(), loop,
                  OptimConfig(lr=1e-3), progress=False)  # fmt: skip
    assert [row["compute/fwd_equiv"] for row in alone.iterations] == first["diffusion_nft"]["fwd_equiv"]


def test_sharded_evaluation_equals_one_process(two_process_reports):
    policy, ledger = make_tiny_policy(seed=0), Ledger()
    with ledger.phase("eval"):
        alone = evaluate_policy(CountingPolicy(policy, ledger), worker.EVAL_BENCHMARK(), make_sampler("flow_sde"),
                                worker.EVAL_SETTINGS, progress=False)  # fmt: skip
    main, other = (report["evaluation"] for report in two_process_reports)
    assert main["images"] == alone.images.tolist() and other["images"] is None  # gathered on the main process
    assert main["scores"] == other["scores"] == alone.scores
    # Process 0 sampled batches 0 and 2 (4 images), process 1 batch 1 and a one-image filler, so both made
    # two 2-step rollouts; the counters (per sample) hold every pass, the filler's included.
    assert ledger.forward["eval"] == 6 * 2 and (main["forward"], other["forward"]) == (4 * 2, 3 * 2)
    assert (main["images_decoded"], other["images_decoded"]) == (4, 3)


def test_a_scoring_failure_stops_every_process(two_process_reports):
    main, other = (report["failed_scoring"] for report in two_process_reports)
    assert main == "ValueError: the judge is down"  # the main process raises the error itself
    assert other == "RuntimeError: the main process failed to score the evaluation (ValueError: the judge is down)"


def test_batch_geometry_is_checked_before_any_compute():
    two = Processes(rank=1, world_size=2)
    loop = LoopConfig(prompts_per_iteration=3, images_per_prompt=4)
    assert check_geometry(METHODS.get("diffusion_nft"), ShapesGenEval(), loop, two) == slice(6, 12)
    assert check_geometry(METHODS.get("diffusion_nft"), ShapesGenEval(), loop, SINGLE) == slice(0, 12)
    with pytest.raises(ValueError, match="cannot be split evenly over 2 processes"):
        check_geometry(
            METHODS.get("diffusion_nft"), ShapesGenEval(), LoopConfig(prompts_per_iteration=3, images_per_prompt=3), two
        )
    with pytest.raises(ValueError, match="needs each prompt's images on one process"):
        check_geometry(METHODS.get("online_dpo"), ShapesGenEval(), loop, two)  # 6 per process split groups of 4
    check_geometry(
        METHODS.get("online_dpo"), ShapesGenEval(), LoopConfig(prompts_per_iteration=4, images_per_prompt=4), two
    )
    running = WeightedReward({"g": ShapesGenEval()}, {"g": 1.0}, normalizers={"g": RunningMeanStd()})
    with pytest.raises(ValueError, match="running statistics"):
        check_geometry(METHODS.get("diffusion_nft"), running, loop, two)


def test_one_process_is_the_identity():
    t = torch.arange(4.0)
    assert SINGLE.gather(t) is t and SINGLE.sum([1.0, 2.0]) == [1.0, 2.0] and SINGLE.seed_keys == ()
    rollout = Rollout([Prompt("p")] * 4, torch.tensor([0, 0, 1, 1]), Cond({"c": torch.zeros(4, 1)}), torch.zeros(4, 1))
    assert rollout.mine(t) is t and rollout.all_group_ids is rollout.group_ids and not rollout.shared
    shared = Rollout([Prompt("p")] * 2, torch.tensor([1, 1]), Cond({"c": torch.zeros(2, 1)}), torch.zeros(2, 1),
                     batch_group_ids=torch.tensor([0, 0, 1, 1]), batch_index=torch.tensor([2, 3]))  # fmt: skip
    assert shared.mine(t).tolist() == [2.0, 3.0] and shared.held(torch.tensor([3, 0, 2])).tolist() == [1, 0]


def test_optimizer_chunks_pad_to_the_step_count():
    g = torch.Generator().manual_seed(0)
    assert [len(c) for c in optimizer_chunks(torch.arange(5), 2, g)] == [3, 2]
    assert [len(c) for c in optimizer_chunks(torch.arange(1), 3, g)] == [1]
    assert [len(c) for c in optimizer_chunks(torch.arange(1), 3, g, pad=True)] == [1, 0, 0]
    assert [len(c) for c in optimizer_chunks(torch.arange(0), 2, g, pad=True)] == [0, 0]
    with pytest.raises(ValueError, match="must be >= 1"):
        optimizer_chunks(torch.arange(3), 0, g)


@pytest.mark.parametrize(("name", "processes", "machines"), [("8gpu", 8, 1), ("4x8gpu", 32, 4)])
def test_shipped_launch_configs_split_the_sd35_suite(name, processes, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    from harness.suite import load_suite

    config = load_config_from_file(str(REPO / "harness" / "launch" / f"{name}.yaml"))
    assert (config.num_processes, config.num_machines) == (processes, machines)
    assert config.distributed_type.value == "MULTI_GPU"
    spec = load_suite("sd35_geneval").config.train
    loop = LoopConfig(prompts_per_iteration=spec.prompts_per_iteration, images_per_prompt=spec.images_per_prompt)
    for rank in (0, processes - 1):
        share = check_geometry(
            METHODS.get("diffusion_nft"), ShapesGenEval(), loop, Processes(rank=rank, world_size=processes)
        )
        assert share.stop - share.start == 48 * 24 // processes


def test_diffrl_run_under_accelerate_launch_writes_one_results_folder(tmp_path):
    suite = {
        "name": "tiny2",
        "benchmark": {"name": "shapes", "options": {"prompts_per_task": 1, "images_per_prompt": 1}},
        "rewards": {"shapes_geneval": {"options": {"judgement": "correct"}}},
        "methods": [{"label": "nft", "method": "diffusion_nft", "config": {"num_steps": 2}},
                    {"label": "grpo", "method": "flow_grpo", "config": {"num_steps": 2, "rollout_cfg": 1.0,
                                                                          "train_cfg": 1.0}}],
        "seeds": [0],
        "budget": {"unit": "iterations", "amount": 2, "eval_at": [1.0]},
        "train": {"prompts_per_iteration": 2, "images_per_prompt": 2},
        "eval": {"num_steps": 2},
    }  # fmt: skip
    path = tmp_path / "tiny2.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = tmp_path / "out"
    done = launch_two_processes("harness.cli", "run", str(path), "--out", str(out), "--no-progress")
    assert done.stdout.count("wrote ") == 1  # one report, from the main process
    rows = read_results(out)
    assert sorted(set(rows["variant"])) == ["grpo", "nft"] and len(rows) == 4  # 2 cells x (base + final)
    for label in ("nft", "grpo"):
        assert json.loads((out / "cells" / label / "seed0" / "status.json").read_text())["status"] == "done"


class _NotCheckedForFSDP(DiffusionNFT):
    """A registered-for-the-test method that declares it has not been checked under FSDP."""

    capabilities = dataclasses.replace(DiffusionNFT.capabilities, fsdp=False)


def test_a_method_not_checked_for_fsdp_is_refused_before_any_compute(tmp_path, monkeypatch):
    import harness.runner as runner
    from harness.suite import validate_suite

    fsdp_two = Processes(rank=0, world_size=2, fsdp=True)
    loop = LoopConfig(prompts_per_iteration=2, images_per_prompt=2)
    check_geometry(DiffusionNFT, ShapesGenEval(), loop, fsdp_two)
    with pytest.raises(ValueError, match="method 'unchecked' is not supported under FSDP .*launch it data-parallel"):
        check_geometry(_NotCheckedForFSDP, ShapesGenEval(), loop, fsdp_two, label="unchecked")
    monkeypatch.setattr(runner, "load_policy", lambda *args: pytest.fail("a model was loaded before the refusal"))
    suite = {
        "name": "fsdp",
        "rewards": {"shapes_geneval": {}},
        "methods": [{"label": "nft", "method": "diffusion_nft"}, {"label": "unchecked", "method": "unchecked"}],
        "budget": {"amount": 1},
    }
    refused = pytest.raises(ValueError, match="method 'unchecked' is not supported under FSDP")
    with METHODS.temporarily("unchecked", f"{__name__}:_NotCheckedForFSDP"), refused:
        runner.run_suite(validate_suite(suite), tmp_path / "out", progress=False, processes=fsdp_two)
    assert not (tmp_path / "out").exists()
