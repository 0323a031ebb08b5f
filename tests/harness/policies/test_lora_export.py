"""LoRA out of every SD3/FLUX cell: ``lora/`` (θ) and ``lora_ema/`` (its EMA) that diffusers' ``load_lora_weights``
reads, written by ``diffrl run`` when a cell finishes and by ``diffrl export-lora`` from any checkpoint."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import harness.bench.sd3_check as sd3_check
from harness.cli import USER_ERROR, main
from harness.policies.flux import FluxPolicy, latent_image_ids, pack_latents, unpack_latents
from harness.policies.lora import LORA_FILE, checkpoint_lora_states, export_checkpoint_lora
from harness.policies.sd3 import SD3LoRAConfig, SD3Policy
from harness.runner import run_suite
from harness.suite import validate_suite
from rewards import REWARDS
from tests.harness.policies.tiny_flux import save_tiny_flux_pipeline
from tests.harness.policies.tiny_sd3 import save_tiny_sd3_pipeline
from tests.harness.test_suite_flux import TINY_FLUX
from tests.harness.test_suite_sd3 import TINY_SD3

PROMPTS = ["a red cube", "two blue balls"]


def sd3_output(transformer: Any, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
    """The transformer as StableDiffusion3Pipeline calls it (timestep = 1000·t)."""
    return transformer(
        hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.tensors["prompt_embeds"],
        pooled_projections=cond.tensors["pooled_prompt_embeds"], return_dict=False,
    )[0]  # fmt: skip


def flux_output(transformer: Any, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
    """The transformer as FluxPipeline calls it (packed latents, t = timestep / 1000, guidance 3.5), unpacked."""
    embeds = cond.tensors["prompt_embeds"]
    out = transformer(
        hidden_states=pack_latents(x), timestep=t, guidance=torch.full((x.shape[0],), 3.5),
        pooled_projections=cond.tensors["pooled_prompt_embeds"], encoder_hidden_states=embeds,
        txt_ids=torch.zeros(embeds.shape[1], 3), img_ids=latent_image_ids(*x.shape[2:]), return_dict=False,
    )[0]  # fmt: skip
    return unpack_latents(out, *x.shape[2:])


KINDS: dict[str, tuple[dict, Callable[[Path], Path], type, Callable[..., torch.Tensor], str]] = {
    "sd3": (TINY_SD3, save_tiny_sd3_pipeline, SD3Policy, sd3_output, "StableDiffusion3Pipeline"),
    "flux": (TINY_FLUX, save_tiny_flux_pipeline, FluxPolicy, flux_output, "FluxPipeline"),
}


@pytest.fixture(scope="module", params=sorted(KINDS))
def finished_cell(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any]:
    """(kind, cell folder, suite) of a one-cell, one-iteration DiffusionNFT run on the tiny pipeline, offline."""
    kind = request.param
    data, save, *_ = KINDS[kind]
    pipeline = save(tmp_path_factory.mktemp(f"tiny_{kind}"))
    data = copy.deepcopy(data)
    data["model"]["checkpoint"] = str(pipeline)
    data |= {"methods": data["methods"][:1], "report": {}, "rewards": {"brightness": {}}}
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        with REWARDS.temporarily("brightness", f"{sd3_check.__name__}:Brightness"):
            suite = validate_suite(data)
            outcome = run_suite(suite, out, progress=False)
    assert [(c.status, c.error) for c in outcome.cells] == [("done", None)]
    return kind, out / "cells" / "nft" / "seed0", suite


def test_a_finished_cell_leaves_lora_folders_that_diffusers_loads(finished_cell):
    import diffusers

    kind, cell, suite = finished_cell
    _, _, policy_cls, raw, pipeline_name = KINDS[kind]
    theta, ema = checkpoint_lora_states(cell / "checkpoint.pt")
    assert any(not torch.equal(theta[k], ema[k]) for k in theta)  # one iteration moved θ away from its EMA
    policy = policy_cls.from_pretrained(suite.config.model.checkpoint, suite.model_config, device="cpu")
    g = torch.Generator().manual_seed(0)
    x, t, cond = torch.randn(2, *policy.sample_shape, generator=g), torch.tensor([0.3, 0.8]), policy.encode(PROMPTS)
    for folder, weights in (("lora", theta), ("lora_ema", ema)):
        assert (cell / folder / LORA_FILE).is_file()
        policy.load_weight_state("train", weights)
        with torch.no_grad():
            expected = policy.velocity(x, t, cond)
        pipe = getattr(diffusers, pipeline_name).from_pretrained(suite.config.model.checkpoint)
        pipe.load_lora_weights(cell / folder)  # α/r comes from the file's metadata
        with torch.no_grad():
            torch.testing.assert_close(raw(pipe.transformer, x, t, cond), expected, atol=1e-5, rtol=0)


def test_export_lora_writes_a_checkpoints_theta_or_ema(finished_cell, tmp_path, capsys):
    _, cell, _ = finished_cell
    assert main(["export-lora", str(cell), str(tmp_path / "ema"), "--ema"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["export-lora", str(cell / "checkpoint.pt"), str(tmp_path / "theta")]) == 0
    for name, folder in (("ema", "lora_ema"), ("theta", "lora")):
        exported, written = load_file(tmp_path / name / LORA_FILE), load_file(cell / folder / LORA_FILE)
        assert exported.keys() == written.keys() and all(torch.equal(exported[k], written[k]) for k in exported)


def test_export_lora_refuses_what_it_cannot_export(finished_cell, tmp_path, capsys):
    _, cell, _ = finished_cell
    assert main(["export-lora", str(tmp_path / "missing"), str(tmp_path / "out")]) == USER_ERROR
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "loose.pt").write_bytes((cell / "checkpoint.pt").read_bytes())  # no suite.yaml above it
    assert main(["export-lora", str(tmp_path / "loose.pt"), str(tmp_path / "out")]) == USER_ERROR
    assert "pass --suite" in capsys.readouterr().err
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text("model: {kind: tiny_dit}\n")
    assert main(["export-lora", str(tmp_path / "loose.pt"), str(tmp_path / "out"), "--suite", str(suite_file)]) == 2
    assert "only sd3 and flux runs train LoRA" in capsys.readouterr().err
    suite_file.write_text("model: {kind: sd3, options: {lora: {rank: 8, alpha: 8}}}\n")
    assert main(["export-lora", str(tmp_path / "loose.pt"), str(tmp_path / "out"), "--suite", str(suite_file)]) == 2
    assert "rank [4], but its configuration says rank 8" in capsys.readouterr().err


def test_checkpoints_without_lora_or_ema_are_refused(tmp_path):
    lora = SD3LoRAConfig(rank=2, alpha=4.0)
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a harness.trainer checkpoint"):
        export_checkpoint_lora(tmp_path / "other.pt", tmp_path / "out", "sd3", lora)
    full = {"weights": {"train": {"blocks.0.weight": torch.zeros(2)}}, "optim": {"ema": {"shadow": [torch.zeros(2)]}}}
    torch.save(full, tmp_path / "full.pt")
    with pytest.raises(ValueError, match="holds no LoRA weights"):
        export_checkpoint_lora(tmp_path / "full.pt", tmp_path / "out", "sd3", lora)
    theta = {"a.to_q.lora_A.weight": torch.zeros(2, 8), "a.to_q.lora_B.weight": torch.zeros(8, 2)}
    torch.save({"weights": {"train": theta}, "optim": {"ema": {"shadow": [torch.zeros(2, 8)]}}}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="do not align"):
        export_checkpoint_lora(tmp_path / "short.pt", tmp_path / "out", "sd3", lora)
    with pytest.raises(ValueError, match="model kind 'tiny_dit' has no LoRA files"):
        torch.save(
            {"weights": {"train": theta}, "optim": {"ema": {"shadow": list(theta.values())}}}, tmp_path / "ok.pt"
        )
        export_checkpoint_lora(tmp_path / "ok.pt", tmp_path / "out", "tiny_dit", lora)
    assert not (tmp_path / "out").exists()
