"""Suites with ``model.kind: flux``: keys, true-CFG refusals and schedule shifts are checked before any compute,
and a tiny FLUX pipeline runs end to end."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import harness.bench.sd3_check as sd3_check
import harness.runner as runner
from harness.config import ConfigError
from harness.distributed import Processes
from harness.policies.flux import DEFAULT_MODEL, FluxLoRAConfig, FluxPolicy, FluxPolicyConfig, dynamic_shift_mu
from harness.runner import SuiteOutcome, run_suite
from harness.store import read_results
from harness.suite import load_suite, validate_suite
from harness.suite_model import FLUX_DEV_SCHEDULER, expected_flux_shift
from methods import METHODS
from rewards import REWARDS
from tests.harness.policies import tiny_flux

# The tiny pipeline's VAE halves the side once (vae_scale_factor 2): 16 px → an 8 × 8 latent → 16 packed tokens.
TINY_SHIFT = math.exp(dynamic_shift_mu(16, tiny_flux.FLUX_DEV_SCHEDULER))  # 1.583, FluxPipeline's at 16 px
DEV_SHIFT_512 = 1.878  # FLUX.1-dev at 512 px (docs/flux.md)
# One DiffusionNFT and one FlowGRPO (cfg 1) cell on the tiny pipeline (16 px images), one iteration each; the
# shapes benchmark judges any image size by rules, with no weights to download. "checkpoint" is filled in.
TINY_FLUX = {
    "name": "tiny_flux",
    "benchmark": {"name": "shapes", "options": {"prompts_per_task": 1, "images_per_prompt": 1}},
    "model": {
        "kind": "flux",
        "device": "cpu",
        "options": {"resolution": 16, "dtype": "fp32", "lora": {"rank": 4, "alpha": 8}},
    },
    "rewards": {"shapes_geneval": {}},
    "methods": [
        {
            "label": "nft",
            "method": "diffusion_nft",
            "config": {"num_steps": 2, "shift": TINY_SHIFT, "train_batch_size": 4},
        },
        {
            "label": "grpo",
            "method": "flow_grpo",
            "config": {
                "num_steps": 2,
                "shift": TINY_SHIFT,
                "train_batch_size": 4,
                "rollout_cfg": 1.0,
                "train_cfg": 1.0,
                "kl_coef": 0.0,
            },
        },
    ],  # fmt: skip
    "seeds": [0],
    "budget": {"unit": "iterations", "amount": 1, "eval_at": [1.0]},
    "train": {"prompts_per_iteration": 2, "images_per_prompt": 2},
    "eval": {"num_steps": 2, "shift": TINY_SHIFT, "grids": 1},
    "report": {"reference": "grpo"},
}


@pytest.fixture(scope="module")
def pipeline(tiny_flux_dir) -> Path:
    """The tiny FLUX.1-dev-like pipeline saved to disk (guidance embedding, FLUX.1-dev's scheduler)."""
    return tiny_flux_dir


def tiny(pipeline: Path, **model: object) -> dict:
    """TINY_FLUX on ``pipeline`` with ``model`` keys replaced (a value None removes the key)."""
    data = copy.deepcopy(TINY_FLUX)
    data["model"]["checkpoint"] = str(pipeline)
    for key, value in model.items():
        if value is None:
            data["model"].pop(key, None)
        else:
            data["model"][key] = value
    return data


def with_methods(data: dict, *methods: dict, eval_shift: float | None = None) -> dict:
    data = {**copy.deepcopy(data), "methods": list(methods), "report": {}}
    if eval_shift is not None:
        data["eval"] = {**data["eval"], "shift": eval_shift}
    return data


def config_only_copy(pipeline: Path, dest: Path, **transformer: object) -> Path:
    """The pipeline's JSON configs without its weights (all that validation reads), transformer keys replaced."""
    for path in pipeline.rglob("*.json"):
        target = dest / path.relative_to(pipeline)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    config = dest / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **transformer}))
    return dest


def test_flux_defaults_are_filled_in_and_options_build_the_policy_config(pipeline):
    data = tiny(pipeline, checkpoint=None, options={}, device=None)
    data = with_methods(
        data, {"label": "nft", "method": "diffusion_nft", "config": {"shift": DEV_SHIFT_512}}, eval_shift=DEV_SHIFT_512
    )
    suite = validate_suite(data)  # FLUX.1-dev: nothing is read or downloaded
    model = suite.config.model
    assert (model.checkpoint, model.finetune, model.device) == (DEFAULT_MODEL, "lora", "auto")
    assert suite.model_config == FluxPolicyConfig()
    options = suite.resolved()["model"]["options"]
    assert (options["resolution"], options["guidance"], options["lora"]["rank"], options["lora"]["alpha"]) == (
        512, 3.5, 64, 128.0,
    )  # fmt: skip
    small = validate_suite(tiny(pipeline))
    assert small.model_config == FluxPolicyConfig(resolution=16, dtype="fp32", lora=FluxLoRAConfig(rank=4, alpha=8.0))
    assert small.config.model.checkpoint == str(pipeline)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"options": {"lora": {"rnak": 8}}}, r"unknown key suite\.model\.options\.lora\.rnak\. Did you mean 'rank'\?"),
        ({"options": {"guidence": 3.5}}, r"unknown key suite\.model\.options\.guidence\. Did you mean 'guidance'"),
        ({"options": {"dtype": "fp16"}}, r"suite\.model\.options\.dtype = 'fp16': training needs loss scaling"),
        ({"options": {"lora": {"alpha": 0}}}, r"suite\.model\.options\.lora: rank must be >= 1, alpha > 0"),
        (
            {"options": {"resolution": 18}},
            r"suite\.model\.options\.resolution = 18: FLUX packs 2×2 .* multiple of "
            r"2 × vae_scale_factor = 4; e\.g\. 16",
        ),  # fmt: skip
        ({"options": {"guidance": None}}, r"suite\.model\.options\.guidance = null, but .* has a guidance embedding"),
        ({"finetune": "full"}, r"suite\.model\.finetune = 'full': the FLUX policy trains LoRA .* use finetune: lora"),
        ({"checkpoint": "/nonexistent/flux"}, r"suite\.model\.checkpoint = '/nonexistent/flux' is neither a folder"),
        ({"device": "gpu"}, r"suite\.model\.device = 'gpu'; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'"),
        ({"kind": "tiny_dit", "options": {"resolution": 64}}, r"options configure kind 'sd3' .* kind 'flux'"),
    ],
)
def test_bad_model_keys_are_refused_with_the_key_and_the_fix(pipeline, model, message):
    data = tiny(pipeline)
    data["model"] = model if model.get("kind") == "tiny_dit" else {**data["model"], **model}
    with pytest.raises(ConfigError, match=message):
        validate_suite(data)


def test_a_checkpoint_folder_must_hold_a_flux_pipelines_configs(pipeline, tmp_path):
    with pytest.raises(ConfigError, match=r"is a folder without model_index\.json; give a diffusers FluxPipeline"):
        validate_suite(tiny(pipeline, checkpoint=str(tmp_path)))
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"has no scheduler/scheduler_config\.json"):
        validate_suite(tiny(pipeline, checkpoint=str(tmp_path)))


def test_a_transformer_without_guidance_embedding_takes_guidance_null(pipeline, tmp_path):
    schnell_like = config_only_copy(pipeline, tmp_path / "schnell", guidance_embeds=False)
    with pytest.raises(ConfigError, match=r"suite\.model\.options\.guidance = 3\.5, but .* no guidance embedding"):
        validate_suite(tiny(pipeline, checkpoint=str(schnell_like)))
    options = {**TINY_FLUX["model"]["options"], "guidance": None}
    assert validate_suite(tiny(pipeline, checkpoint=str(schnell_like), options=options)).model_config.guidance is None


@pytest.mark.parametrize(
    ("method", "key"),
    [
        ({"method": "flow_grpo", "config": {"shift": TINY_SHIFT}}, "config.rollout_cfg = 4.5"),  # FlowGRPO's defaults
        ({"method": "flow_grpo", "config": {"shift": TINY_SHIFT, "rollout_cfg": 1.0}}, "config.train_cfg = 4.5"),
        ({"method": "flow_grpo_fast", "config": {"shift": TINY_SHIFT, "rollout_cfg": 4.5}}, "config.rollout_cfg = 4.5"),
        ({"method": "online_dpo", "config": {"shift": TINY_SHIFT}}, "config.guidance_scale = 4.5"),  # its default
        (
            {"method": "diffusion_nft", "config": {"shift": TINY_SHIFT, "guidance_scale": 2.0}},
            "config.guidance_scale = 2",
        ),
        ({"method": "raft", "config": {"shift": TINY_SHIFT, "guidance_scale": 4.5}}, "config.guidance_scale = 4.5"),
        ({"method": "rwr", "config": {"shift": TINY_SHIFT, "guidance_scale": 4.5}}, "config.guidance_scale = 4.5"),
        ({"method": "awm", "config": {"shift": TINY_SHIFT, "guidance_scale": 3.0}}, "config.guidance_scale = 3"),
        ({"method": "diffusion_nft", "config": {"shift": TINY_SHIFT}, "eval_cfg": 4.5}, "eval_cfg = 4.5"),
    ],
)
def test_true_cfg_is_refused_naming_the_key_and_the_distilled_guidance(pipeline, method, key):
    data = with_methods(tiny(pipeline), TINY_FLUX["methods"][0], {"label": "v", **method})
    with pytest.raises(ConfigError) as error:
        validate_suite(data)
    message = str(error.value)
    assert message.startswith(f"suite.methods[1].{key} (v): FLUX.1 is guidance-distilled"), message
    assert "suite.model.options.guidance (3.5)" in message and "FlowGRPO's FLUX configs (cfg 1)" in message


def test_every_cfg_field_of_a_registered_method_is_declared():
    """A method whose config sets CFG must declare the field in capabilities.guidance_fields (or FLUX runs fail late)."""
    for name in METHODS.keys():  # noqa: SIM118 (a Registry, not a dict)
        method_cls = METHODS.get(name)
        fields = {f.name for f in dataclasses.fields(method_cls.Config)}
        cfg_like = {f for f in fields if "cfg" in f or "guidance" in f}
        declared = set(method_cls.capabilities.guidance_fields)
        assert cfg_like == declared, (name, cfg_like ^ declared)


def test_the_expected_shift_is_the_loaded_policys_schedule_shift(pipeline):
    """Validation's shift (config files only) equals FluxPolicy.schedule_shift after loading, at two resolutions."""
    assert expected_flux_shift(DEFAULT_MODEL, 512) == pytest.approx(1.8776, abs=1e-4)
    assert expected_flux_shift(DEFAULT_MODEL, 1024) == pytest.approx(3.1582, abs=1e-4)
    assert expected_flux_shift("someone/flux-finetune", 512) is None  # another hub id: unknown before loading
    assert FLUX_DEV_SCHEDULER == tiny_flux.FLUX_DEV_SCHEDULER  # the two copies of FLUX.1-dev's scheduler config
    for resolution in (16, 32):
        policy = FluxPolicy.from_pretrained(
            pipeline, FluxPolicyConfig(resolution=resolution, dtype="fp32"), device="cpu"
        )
        assert expected_flux_shift(str(pipeline), resolution) == pytest.approx(policy.schedule_shift, rel=1e-12)
    assert expected_flux_shift(str(pipeline), 16) == pytest.approx(TINY_SHIFT)


def test_an_unshifted_schedule_is_refused_and_another_shift_is_a_warning(pipeline, caplog):
    nft = {"label": "nft", "method": "diffusion_nft"}
    with pytest.raises(ConfigError, match=r"suite\.methods\[0\]\.config\.shift = 1, but FluxPipeline samples .* at "
                                          r"16 px with shift 1\.583 .* set shift: 1\.583"):  # fmt: skip
        validate_suite(with_methods(tiny(pipeline), nft))  # the method's default shift
    with pytest.raises(ConfigError, match=r"suite\.eval\.shift = 1, .* set shift: 1\.583"):
        validate_suite(with_methods(tiny(pipeline), {**nft, "config": {"shift": TINY_SHIFT}}, eval_shift=1.0))
    with caplog.at_level(logging.WARNING, logger="harness.suite"):
        validate_suite(with_methods(tiny(pipeline), {**nft, "config": {"shift": 1.58}}))  # within 1 %: no warning
        assert not caplog.records
        validate_suite(with_methods(tiny(pipeline), {**nft, "config": {"shift": 3.0}}))  # DanceGRPO's: deliberate
    assert [r.getMessage() for r in caplog.records] == [
        f"suite.methods[0].config.shift = 3, but FluxPipeline samples {pipeline} at 16 px with shift 1.583: it "
        "samples FLUX on another schedule than its pipeline"
    ]
    other = with_methods(tiny(pipeline, checkpoint="someone/flux-finetune"), nft, eval_shift=1.0)
    assert validate_suite(other).config.model.checkpoint == "someone/flux-finetune"  # not checked: unknown


@pytest.fixture
def no_downloads(tmp_path, monkeypatch):
    """An empty prompt-file cache, and any download attempt fails."""
    import harness.data_files as files

    def refuse(file, path):
        raise AssertionError(f"validation downloaded {file.key}")

    monkeypatch.setenv("DIFFRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(files, "download", refuse)


def test_the_builtin_flux_suite_validates_offline_with_the_official_recipes(no_downloads):
    suite = load_suite("flux_pickscore")
    cfg = suite.config
    assert (cfg.model.kind, cfg.model.checkpoint, cfg.model.finetune) == ("flux", DEFAULT_MODEL, "lora")
    assert suite.model_config == FluxPolicyConfig(resolution=512, dtype="bf16", guidance=3.5)  # r 64 / α 128
    assert "GPUs" in cfg.description and "gated" in cfg.description and "token" in cfg.description
    nft, grpo = suite.method_configs["diffusion_nft"], suite.method_configs["flow_grpo"]
    assert (nft.sampler, nft.num_steps, nft.beta, nft.kl_coef, nft.guidance_scale) == ("dpm2", 10, 1.0, 1e-4, 1.0)
    assert (grpo.num_steps, grpo.noise_level, grpo.kl_coef, grpo.optimizer_steps_per_iteration) == (6, 0.9, 0.0, 2)
    assert (grpo.rollout_cfg, grpo.train_cfg) == (1.0, 1.0)
    expected = expected_flux_shift(DEFAULT_MODEL, 512)
    for shift in (nft.shift, grpo.shift, cfg.eval.shift):
        assert shift == pytest.approx(expected, rel=1e-3)
    assert {suite.eval_settings(label).guidance_scale for label in suite.method_configs} == {1.0}
    assert (cfg.eval.num_steps, cfg.train.prompts_per_iteration, cfg.train.images_per_prompt) == (28, 48, 24)
    assert runner.build_benchmark(suite).name == "pickapic"


def test_load_policy_puts_flux_on_the_process_gpu(pipeline, monkeypatch):
    calls = []
    monkeypatch.setattr(FluxPolicy, "from_pretrained", lambda *args, **kwargs: calls.append((args, kwargs)))
    suite = validate_suite(tiny(pipeline))
    on_cuda = dataclasses.replace(suite.config, model=dataclasses.replace(suite.config.model, device="cuda"))
    suite = dataclasses.replace(suite, config=on_cuda)
    runner.load_policy(suite, Processes(rank=1, world_size=2, device=torch.device("cuda:1")))
    runner.load_policy(suite)
    assert calls == [
        ((str(pipeline), suite.model_config), {"device": "cuda:1"}),
        ((str(pipeline), suite.model_config), {"device": "cuda"}),
    ]


@pytest.fixture(scope="module")
def tiny_run(pipeline, tmp_path_factory) -> Iterator[tuple[dict, Path, SuiteOutcome]]:
    """(suite data, results folder, outcome) of TINY_FLUX on the tiny pipeline, offline.

    Training uses a test-only reward, mean brightness (harness/bench/sd3_check.py): the rule-based shapes
    reward gives every image of a group the same score on this random model, and FlowGRPO then skips the update.
    """
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        with REWARDS.temporarily("brightness", f"{sd3_check.__name__}:Brightness"):
            data = {**tiny(pipeline), "rewards": {"brightness": {}}}
            yield data, out, run_suite(validate_suite(data), out, progress=False)


def test_a_suite_trains_the_tiny_flux_pipeline_end_to_end(tiny_run):
    _, out, outcome = tiny_run
    assert [(c.label, c.status, c.error) for c in outcome.cells] == [("nft", "done", None), ("grpo", "done", None)]
    df = read_results(out)
    assert sorted(zip(df["variant"], df["iteration"], strict=True)) == [
        ("grpo", 0), ("grpo", 1), ("nft", 0), ("nft", 1),
    ]  # fmt: skip
    assert df["eval/overall"].map(math.isfinite).all()
    trained = df[df["iteration"] == 1].set_index("variant")
    assert (trained["compute/images_sampled"] == 4).all()  # 2 prompts x 2 images
    # No CFG doubling: per image, NFT 2 sampling + 1 step × (3 forwards + 2 for the backward); FlowGRPO (no KL)
    # 2 sampling + 1 step × (1 forward + 2 for the backward).
    assert (trained.loc["nft", "compute/fwd_equiv"], trained.loc["grpo", "compute/fwd_equiv"]) == (4 * 7, 4 * 5)
    for label in ("nft", "grpo"):
        cell = out / "cells" / label / "seed0"
        iteration = json.loads((cell / "iterations.jsonl").read_text().splitlines()[0])
        assert iteration["train/grad_norm"] > 0  # the LoRA received gradients
    assert (out / "samples" / "base_cfg1.png").is_file() and (out / "samples" / "grpo_seed0_point1.png").is_file()
    resolved = (out / "suite.yaml").read_text()
    assert "kind: flux" in resolved and "guidance: 3.5" in resolved and "rank: 4" in resolved
