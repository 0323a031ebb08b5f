"""FSDP2: two gloo CPU processes launched with the shipped FSDP config agree with one process and with DDP.

The tiny DiT (full fine-tuning, three parameter copies) and the tiny SD3 / FLUX pipelines (θ / old LoRA adapters).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from harness.bench.sd3_check import Brightness, FixedPrompts
from harness.distributed import SINGLE, Processes
from harness.fsdp import requested, shard_policy, zero_missing_gradients
from harness.optim import OptimConfig, Optimization
from harness.store import read_results
from harness.trainer import LoopConfig, check_fsdp, check_geometry, train
from methods import METHODS
from methods.base import Capabilities
from methods.diffusion_nft import DiffusionNFT, DiffusionNFTConfig
from rewards.shapes import ShapesGenEval
from tests.conftest import make_tiny_policy
from tests.harness import fsdp_worker as worker
from tests.harness.test_distributed import REPO, free_port

CONFIG = REPO / "harness" / "launch" / "8gpu_fsdp.yaml"
FSDP_TWO = Processes(rank=0, world_size=2, fsdp=True)


def launch_fsdp(*module_and_args: str) -> subprocess.CompletedProcess[str]:
    """``accelerate launch --config_file 8gpu_fsdp.yaml`` with 2 gloo CPU processes running ``python -m MODULE``."""
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(CONFIG), "--num_processes", "2",
               "--main_process_port", str(free_port()), "--module", *module_and_args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def launch(
    tmp_path_factory: pytest.TempPathFactory, tiny_sd3_dir: Path, tiny_flux_dir: Path
) -> tuple[Path, list[dict]]:
    """The worker's reports (full tensors) and its output folder."""
    out = tmp_path_factory.mktemp("fsdp")
    launch_fsdp("tests.harness.fsdp_worker", str(out), str(tiny_sd3_dir), str(tiny_flux_dir))
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def assert_one_step_matches(runs: dict[str, dict], alone: dict) -> None:
    """The sharded and the replicated step both equal the one-process step on the whole batch."""
    sharded, replicated = runs["fsdp"], runs["dp"]
    assert sharded["sharded"] and not replicated["sharded"]
    assert sharded["local_numel"] < sharded["numel"] == replicated["local_numel"]  # each holds a shard
    for run in (sharded, replicated):
        # the grad norm would halve if gradients were averaged twice (by FSDP and by the harness)
        for key in ("loss", "grad_norm", "v_old_sum"):
            assert run[key] == pytest.approx(alone[key], rel=1e-5), key
        assert_close(run["weights"], alone["weights"])
        for got, expected in zip(run["ema"], alone["ema"], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_one_step_under_fsdp_equals_one_process_and_data_parallel(launch):
    _, reports = launch
    alone = worker.one_step(SINGLE, make_tiny_policy(0, worker.DEPTH), worker.PROMPTS)
    assert [r["fsdp"] for r in reports] == [True, True]  # the shipped config's environment was read
    for report in reports:
        assert_one_step_matches(report["one_step"], alone)
    assert not torch.equal(alone["weights"]["final.weight"], make_tiny_policy(0, worker.DEPTH).model.final.weight)


def test_training_under_fsdp_equals_data_parallel_and_resumes(launch):
    _, reports = launch
    for report in reports:
        runs = report["end_to_end"]
        sharded, replicated, resumed = runs["fsdp"], runs["dp"], runs["resumed"]
        for key in ("losses", "reward_means", "fwd_equiv"):
            assert sharded[key] == pytest.approx(replicated[key], rel=1e-5), key
            # a resumed run's earlier logs are the main process's (from its checkpoint)
            assert resumed[key] == reports[0]["end_to_end"]["fsdp"][key][:1] + sharded[key][1:], key
        for which in ("weights", "old"):
            assert_close(sharded[which], replicated[which])
            assert_close(resumed[which], sharded[which])
        assert resumed["resumed_from"] == 1
    first, second = (r["end_to_end"]["fsdp"] for r in reports)
    assert len(first["evaluations"]) == 2 and second["evaluations"] == []  # every process evaluates, main records
    assert first["evaluations"] == reports[0]["end_to_end"]["dp"]["evaluations"]
    assert_close(first["weights"], second["weights"])


@pytest.mark.parametrize("name", worker.FSDP_METHODS)
def test_every_method_under_fsdp_equals_data_parallel(launch, name):
    _, reports = launch
    for report in reports:
        sharded, replicated = report["methods"][name]["fsdp"], report["methods"][name]["dp"]
        assert len(sharded["logs"]) == len(replicated["logs"]) == 2
        for got, expected in zip(sharded["logs"], replicated["logs"], strict=True):
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-7)
        assert_close(sharded["weights"], replicated["weights"])
        assert not torch.equal(sharded["weights"]["final.weight"], make_tiny_policy(0, worker.DEPTH).model.final.weight)
    fillers = {
        name: runs["fsdp"]["training_fwd"] - runs["dp"]["training_fwd"] for name, runs in reports[0]["methods"].items()
    }
    # Where the processes keep different numbers of samples, FSDP padded the lighter one with filler passes
    # (counted); where they always keep equal shares, nothing was added.
    assert fillers[name] > 0 if METHODS.get(name).capabilities.trains_on_subset else fillers[name] == 0


def test_checkpoint_saved_under_fsdp_loads_in_one_process(launch, tmp_path):
    out, reports = launch
    checkpoint = tmp_path / "checkpoint.pt"
    shutil.copy(out / "fsdp.pt", checkpoint)
    policy = make_tiny_policy(seed=0, depth=worker.DEPTH)
    loop = LoopConfig(iterations=2, prompts_per_iteration=2, images_per_prompt=2)
    result = train(DiffusionNFT, DiffusionNFTConfig(num_steps=2), policy, worker.ShapesBenchmark(), ShapesGenEval(),
                   loop, OptimConfig(lr=1e-3), progress=False, checkpoint=checkpoint)  # fmt: skip
    assert result.resumed_from == 2 and len(result.evaluations) == 2
    sharded = reports[0]["end_to_end"]["fsdp"]
    assert_close(policy.weight_state("train"), sharded["weights"])
    assert_close(policy.weight_state("old"), sharded["old"])


def test_lora_step_under_fsdp_equals_one_process_and_data_parallel(launch, tiny_sd3_dir, tiny_flux_dir):
    _, reports = launch
    sd3 = worker.one_step(SINGLE, worker.load_sd3(tiny_sd3_dir), worker.SD3_PROMPTS)
    flux = worker.one_step(SINGLE, worker.load_flux(tiny_flux_dir), worker.SD3_PROMPTS)
    for report in reports:
        assert_one_step_matches(report["sd3_one_step"], sd3)
        assert_one_step_matches(report["flux_one_step"], flux)


def test_sd3_lora_training_under_fsdp_checkpoints_and_saves_the_lora(launch, tiny_sd3_dir, tmp_path):
    out, reports = launch
    for report in reports:
        sharded, replicated = report["sd3_end_to_end"]["fsdp"], report["sd3_end_to_end"]["dp"]
        for key in ("losses", "grad_norms"):
            assert sharded[key] == pytest.approx(replicated[key], rel=1e-5), key
        assert_close(sharded["weights"], replicated["weights"])
        assert_close(sharded["old"], replicated["old"])
    trained = reports[0]["sd3_end_to_end"]["fsdp"]
    assert any(v.abs().sum() > 0 for k, v in trained["weights"].items() if "lora_B" in k)  # B moved off 0
    for rank in (0, 1):  # save_lora gathered the shards on every process
        fresh = worker.load_sd3(tiny_sd3_dir)
        fresh.load_lora(out / f"sd3_lora_fsdp_rank{rank}")
        assert_close(fresh.weight_state("train"), trained["weights"])
    checkpoint = tmp_path / "sd3.pt"
    shutil.copy(out / "sd3_fsdp.pt", checkpoint)
    policy = worker.load_sd3(tiny_sd3_dir)
    loop = LoopConfig(iterations=1, evaluate=False, prompts_per_iteration=2, images_per_prompt=2)
    result = train(DiffusionNFT, DiffusionNFTConfig(num_steps=2, train_batch_size=4), policy,
                   FixedPrompts(name="tiny", prompts=tuple(worker.SD3_PROMPTS[:3])), Brightness(), loop,
                   OptimConfig(lr=1e-2), progress=False, checkpoint=checkpoint)  # fmt: skip
    assert result.resumed_from == 1
    assert_close(policy.weight_state("train"), trained["weights"])
    assert_close(policy.weight_state("old"), trained["old"])


def test_unsupported_fsdp_settings_are_refused_before_any_compute(monkeypatch):
    loop = LoopConfig(prompts_per_iteration=2, images_per_prompt=2)
    check_geometry(METHODS.get("flow_grpo"), ShapesGenEval(), loop, FSDP_TWO)
    unchecked = type("MyMethod", (), {"capabilities": Capabilities(fsdp=False)})  # not checked for equal passes
    with pytest.raises(ValueError, match="'my_method' is not supported under FSDP"):
        check_fsdp(unchecked, "my_method")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cannot be sharded with FSDP"):
        shard_policy(object(), torch.device("cpu"), 2, True)
    with pytest.raises(ValueError, match="parameters are on \\['cpu'\\] but this launch communicates on 'cuda'"):
        shard_policy(make_tiny_policy(), torch.device("cuda", 0), 2, True)  # the tiny DiT under nccl
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="only FSDP2"):
        requested()
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert requested() == (True, True)
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    with pytest.raises(ValueError, match="FSDP_AUTO_WRAP_POLICY"):
        requested()


def test_a_step_with_no_pass_on_any_process_steps_on_zero_gradients():
    """Under FSDP no all-reduce fills missing gradients; zero_missing_gradients does, as average_gradients does, so a
    padded optimizer step with no pass anywhere still moves AdamW's moments and applies the weight decay."""
    runs = []
    for explicit_zeros in (False, True):
        param = nn.Parameter(torch.arange(3.0))
        sync = None if explicit_zeros else zero_missing_gradients
        optim = Optimization([param], OptimConfig(lr=0.1, weight_decay=0.5), gradient_sync=sync)
        optim.backward(param.square().sum())
        optim.step()  # zero_grad(set_to_none): no gradient until the next backward
        after_one = param.detach().clone()
        if explicit_zeros:
            param.grad = torch.zeros_like(param)
        optim.step()
        assert not torch.equal(param.detach(), after_one)
        runs.append(param.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_shipped_fsdp_config():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIG))
    assert config.distributed_type.value == "FSDP" and config.num_processes == 8
    assert config.fsdp_config["fsdp_version"] == 2


def test_diffrl_run_under_fsdp_writes_one_results_folder(tmp_path):
    suite = {
        "name": "tiny_fsdp",
        "benchmark": {"name": "shapes", "options": {"prompts_per_task": 1, "images_per_prompt": 1}},
        "rewards": {"shapes_geneval": {"options": {"judgement": "correct"}}},
        "methods": [{"label": "nft", "method": "diffusion_nft", "config": {"num_steps": 2}}],
        "seeds": [0, 1],  # the second cell reuses the base scores the main process measured in the first
        "budget": {"unit": "iterations", "amount": 1, "eval_at": [1.0]},
        "train": {"prompts_per_iteration": 2, "images_per_prompt": 2},
        "eval": {"num_steps": 2},
    }
    path = tmp_path / "tiny_fsdp.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = tmp_path / "out"
    done = launch_fsdp("harness.cli", "run", str(path), "--out", str(out), "--no-progress")
    assert done.stdout.count("wrote ") == 1  # one report, from the main process
    rows = read_results(out)
    assert len(rows) == 4 and sorted(set(rows["seed"])) == [0, 1]  # 2 cells x (base + final)
    base = rows[rows["iteration"] == 0]
    assert base["eval/overall"].nunique() == 1 and base["eval/partial_overall"].nunique() == 1
    final = rows[rows["iteration"] == 1].set_index("seed")["compute/eval_fwd"]
    assert final[0] == 2 * final[1] > 0  # seed 1 evaluated only its trained model: every process skipped the base
    for seed in (0, 1):
        assert json.loads((out / "cells" / "nft" / f"seed{seed}" / "status.json").read_text())["status"] == "done"
