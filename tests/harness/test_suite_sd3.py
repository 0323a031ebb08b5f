"""Suites with ``model.kind: sd3``: the new keys are checked before any compute, and a tiny SD3 pipeline runs end to end."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

import harness.bench.sd3_check as sd3_check
import harness.runner as runner
from harness.config import ConfigError
from harness.policies.sd3 import DEFAULT_MODEL, SD3LoRAConfig, SD3PolicyConfig
from harness.runner import SuiteOutcome, run_suite
from harness.store import read_results
from harness.suite import load_suite, validate_suite
from rewards import REWARDS

# One DiffusionNFT and one FlowGRPO cell on the tiny pipeline (16 px images), one iteration each. The shapes
# benchmark judges any image size by rules, with no weights to download (the end-to-end run trains on a
# test-only reward, see tiny_run).
TINY_SD3 = {
    "name": "tiny_sd3",
    "benchmark": {"name": "shapes", "options": {"prompts_per_task": 1, "images_per_prompt": 1}},
    "model": {
        "kind": "sd3",
        "device": "cpu",
        "options": {"resolution": 16, "dtype": "fp32", "lora": {"rank": 4, "alpha": 8}},
    },
    "rewards": {"shapes_geneval": {}},
    "methods": [
        {"label": "nft", "method": "diffusion_nft", "config": {"num_steps": 2, "shift": 3.0, "train_batch_size": 4}},
        {
            "label": "grpo",
            "method": "flow_grpo",
            "config": {"num_steps": 2, "shift": 3.0, "train_batch_size": 4},
            "eval_cfg": 4.5,
        },
    ],
    "seeds": [0],
    "budget": {"unit": "iterations", "amount": 1, "eval_at": [1.0]},
    "train": {"prompts_per_iteration": 2, "images_per_prompt": 2},
    "eval": {"num_steps": 2, "shift": 3.0, "grids": 1},
    "report": {"reference": "grpo"},
}


def with_model(**changes: object) -> dict:
    """TINY_SD3 with ``model`` keys replaced (a value None removes the key)."""
    data = copy.deepcopy(TINY_SD3)
    for key, value in changes.items():
        if value is None:
            data["model"].pop(key, None)
        else:
            data["model"][key] = value
    return data


def test_sd3_defaults_are_filled_in_and_options_build_the_policy_config():
    suite = validate_suite(with_model(options={}, device=None))
    model = suite.config.model
    assert (model.checkpoint, model.finetune, model.device) == (DEFAULT_MODEL, "lora", "auto")  # nothing loaded
    assert suite.model_config == SD3PolicyConfig()
    resolved = suite.resolved()["model"]
    assert resolved["options"]["lora"]["rank"] == 32 and resolved["options"]["resolution"] == 512
    tiny = validate_suite(TINY_SD3)
    assert tiny.model_config == SD3PolicyConfig(resolution=16, dtype="fp32", lora=SD3LoRAConfig(rank=4, alpha=8.0))
    assert tiny.cell_fingerprint("nft", 0) != suite.cell_fingerprint("nft", 0)  # the options are part of a cell


def test_tiny_dit_models_resolve_as_before():
    suite = validate_suite({**TINY_SD3, "model": {"kind": "tiny_dit"}})
    assert suite.model_config is None
    assert suite.resolved()["model"] == {
        "kind": "tiny_dit", "checkpoint": None, "finetune": "full", "options": {}, "device": "auto",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"options": {"lora": {"rnak": 8}}}, r"unknown key suite\.model\.options\.lora\.rnak\. Did you mean 'rank'\?"),
        (
            {"options": {"resolutoin": 512}},
            r"unknown key suite\.model\.options\.resolutoin\. Did you mean 'resolution'",
        ),
        ({"options": {"lora": {"rank": "big"}}}, r"suite\.model\.options\.lora\.rank = 'big'; expected an integer"),
        ({"options": {"lora": {"rank": 0}}}, r"suite\.model\.options\.lora: rank must be >= 1"),
        ({"options": {"dtype": "fp64"}}, r"suite\.model\.options\.dtype = 'fp64'; allowed: 'fp32', 'fp16', 'bf16'"),
        ({"options": {"dtype": "fp16"}}, r"suite\.model\.options\.dtype = 'fp16': training needs loss scaling"),
        ({"options": {"resolution": 0}}, r"suite\.model\.options\.resolution must be >= 1"),
        ({"options": {"max_cached_prompts": 0}}, r"suite\.model\.options\.max_cached_prompts must be >= 1 or null"),
        # Throughput options (harness/policies/throughput.py): checked before any model loads.
        (
            {"options": {"attention_backend": "flash"}},
            r"suite\.model\.options\.attention_backend = 'flash': attention_backend must be one of native, "
            r"_native_flash.*JointAttnProcessor2_0 calls torch's scaled_dot_product_attention itself",
        ),
        (
            {"options": {"attention_backend": "fastest"}},
            r"suite\.model\.options\.attention_backend = 'fastest': attention_backend must be null .* or one of",
        ),
        (
            {"options": {"attention_backend": "_native_cudnn"}},
            r"attention_backend = '_native_cudnn' needs a CUDA device, but suite\.model\.device = 'cpu'",
        ),
        (
            {"options": {"compile_blocks": "yes"}},
            r"suite\.model\.options\.compile_blocks = 'yes'; expected true or false",
        ),
        ({"options": {"autocast": 0}}, r"suite\.model\.options\.autocast = 0; expected true or false"),
        ({"finetune": "full"}, r"suite\.model\.finetune = 'full': the SD3 policy trains LoRA .* use finetune: lora"),
        ({"checkpoint": "/nonexistent/sd3"}, r"suite\.model\.checkpoint = '/nonexistent/sd3' is neither a folder nor"),
        ({"device": "gpu"}, r"suite\.model\.device = 'gpu'; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'"),
        ({"device": "cuda:63"}, r"suite\.model\.device = 'cuda:63', but this machine has \d+ CUDA device"),
        ({"kind": "tiny_dit", "options": {"resolution": 64}}, r"suite\.model\.options = .*configure kind 'sd3'"),
        ({"kind": "tiny_dit", "device": "cuda:63"}, r"suite\.model\.device = 'cuda:63', but this machine has \d+"),
    ],
)
def test_bad_model_keys_are_refused_with_the_key_and_the_fix(model, message):
    data = copy.deepcopy(TINY_SD3)
    data["model"] = {**data["model"], **model}
    if model.get("kind") == "tiny_dit":
        data["model"] = model
    with pytest.raises(ConfigError, match=message):
        validate_suite(data)


def test_a_checkpoint_folder_must_hold_a_diffusers_pipeline(tmp_path):
    with pytest.raises(ConfigError, match=r"is a folder without model_index\.json"):
        validate_suite(with_model(checkpoint=str(tmp_path)))
    (tmp_path / "model_index.json").write_text("{}")
    assert validate_suite(with_model(checkpoint=str(tmp_path))).config.model.checkpoint == str(tmp_path)


def test_benchmark_reward_options_need_a_named_reward():
    data = copy.deepcopy(TINY_SD3)
    data["benchmark"]["reward_options"] = {"judgement": "correct"}
    with pytest.raises(ConfigError, match=r"suite\.benchmark\.reward_options configure .* but that is None"):
        validate_suite(data)
    data["benchmark"] = {"name": "geneval", "options": {"reward": "geneval"}, "reward_options": {"judgment": "x"}}
    with pytest.raises(ConfigError, match=r"unknown key suite\.benchmark\.reward_options\.judgment\. Did you mean"):
        validate_suite(data)


@pytest.fixture
def no_downloads(tmp_path, monkeypatch):
    """An empty prompt-file cache, and any download attempt fails."""
    import harness.data_files as files

    def refuse(file, path):
        raise AssertionError(f"validation downloaded {file.key}")

    monkeypatch.setenv("DIFFRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "download", refuse)


def test_the_builtin_sd35_suite_validates_offline_with_the_official_recipes(no_downloads):
    suite = load_suite("sd35_geneval")
    cfg = suite.config
    assert cfg.model.kind == "sd3" and cfg.model.checkpoint == DEFAULT_MODEL and cfg.model.finetune == "lora"
    assert suite.model_config == SD3PolicyConfig(resolution=512, dtype="bf16", lora=SD3LoRAConfig(rank=32, alpha=64.0))
    assert (cfg.train.prompts_per_iteration, cfg.train.images_per_prompt, cfg.train.optim.lr) == (48, 24, 3e-4)
    nft, grpo = suite.method_configs["diffusion_nft"], suite.method_configs["flow_grpo"]
    assert (nft.sampler, nft.num_steps, nft.shift, nft.beta, nft.kl_coef, nft.guidance_scale) == (
        "dpm2",
        10,
        3.0,
        1.0,
        1e-4,
        1.0,
    )
    assert (grpo.num_steps, grpo.shift, grpo.noise_level, grpo.kl_coef, grpo.clip_range) == (10, 3.0, 0.7, 0.04, 1e-4)
    assert (grpo.rollout_cfg, grpo.train_cfg, grpo.optimizer_steps_per_iteration) == (4.5, 4.5, 2)
    assert suite.eval_settings("diffusion_nft").guidance_scale == 1.0
    assert suite.eval_settings("flow_grpo").guidance_scale == 4.5
    assert (cfg.eval.num_steps, cfg.eval.shift) == (40, 3.0)
    benchmark = runner.build_benchmark(suite)  # GenEval's accuracy (0/1), not the partial-credit training score
    assert benchmark.reward.judgement == "correct" and runner.build_reward(suite).judgement == "score"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_sd3_dir) -> Iterator[tuple[dict, Path, SuiteOutcome]]:
    """(suite data, results folder, outcome) of TINY_SD3 on the tiny pipeline, offline.

    Training uses a test-only reward, mean brightness (harness/bench/sd3_check.py): the rule-based shapes
    reward gives every image of a group the same score on this random model, and FlowGRPO then skips the update.
    """
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        with REWARDS.temporarily("brightness", f"{sd3_check.__name__}:Brightness"):
            data = {**with_model(checkpoint=str(tiny_sd3_dir)), "rewards": {"brightness": {}}}
            yield data, out, run_suite(validate_suite(data), out, progress=False)


def test_a_suite_trains_the_tiny_sd3_pipeline_end_to_end(tiny_run):
    _, out, outcome = tiny_run
    assert [(c.label, c.status, c.error) for c in outcome.cells] == [("nft", "done", None), ("grpo", "done", None)]
    df = read_results(out)
    assert sorted(zip(df["variant"], df["iteration"], strict=True)) == [
        ("grpo", 0),
        ("grpo", 1),
        ("nft", 0),
        ("nft", 1),
    ]
    assert df["eval/overall"].map(math.isfinite).all()
    assert (df.loc[df["iteration"] == 1, "compute/images_sampled"] == 4).all()  # 2 prompts x 2 images
    for label in ("nft", "grpo"):
        cell = out / "cells" / label / "seed0"
        assert json.loads((cell / "status.json").read_text())["status"] == "done"
        assert len((cell / "evals.jsonl").read_text().splitlines()) == 2
        iteration = json.loads((cell / "iterations.jsonl").read_text().splitlines()[0])
        assert iteration["train/grad_norm"] > 0  # the LoRA received gradients
    assert (out / "samples" / "base_cfg4.5.png").is_file() and (out / "samples" / "grpo_seed0_point1.png").is_file()
    resolved = (out / "suite.yaml").read_text()
    assert "resolution: 16" in resolved and "rank: 4" in resolved


def test_finished_sd3_cells_are_not_rerun(tiny_run, monkeypatch):
    data, out, _ = tiny_run

    def refuse(suite):
        raise AssertionError("a finished cell loaded the model again")

    monkeypatch.setattr(runner, "load_policy", refuse)
    suite = validate_suite(data)
    assert {c.status for c in run_suite(suite, out, progress=False).cells} == {"done"}
