"""Pretraining is deterministic: the same config gives the same weights, bit for bit."""

import json
import os
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from benchmarks.shapes.checkpoint import BASE_CHECKPOINT, load_shapes_policy
from benchmarks.shapes.pretrain import BASE_ARCHITECTURE, PretrainConfig, lr_factor, pretrain, training_captions
from benchmarks.shapes.prompts import sample_prompts
from harness.checksums import ChecksumError, verify_checksum
from harness.policies.tiny_dit import TinyDiTConfig
from harness.policies.tiny_unet import TinyUNetConfig
from harness.shapes_world.world import VOCABULARY, parse_prompt

SMALL = TinyDiTConfig(vocabulary=VOCABULARY, hidden=32, depth=1, heads=2, text_layers=1)
SMALL_UNET = TinyUNetConfig(
    vocabulary=VOCABULARY, widths=(8, 8, 16), hidden=16, heads=2, text_layers=1, attention_blocks=1
)


def test_same_seed_same_weights(tmp_path):
    cfg = PretrainConfig(steps=3, batch_size=8, warmup_steps=2, threads=1)
    a = load_file(pretrain(cfg, tmp_path / "a", SMALL) / "model.safetensors")
    b = load_file(pretrain(cfg, tmp_path / "b", SMALL) / "model.safetensors")
    c = load_file(
        pretrain(PretrainConfig(steps=3, batch_size=8, warmup_steps=2, threads=1, seed=1), tmp_path / "c", SMALL)
        / "model.safetensors"
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    assert meta["pretrain"]["steps"] == 3 and meta["architecture"]["hidden"] == 32


def test_unet_pretraining_is_deterministic_and_loads_as_the_shapes_policy(tmp_path):
    cfg = PretrainConfig(steps=2, batch_size=4, warmup_steps=1)
    a = load_file(pretrain(cfg, tmp_path / "a", SMALL_UNET) / "model.safetensors")
    b = pretrain(cfg, tmp_path / "b", SMALL_UNET)
    assert all(torch.equal(a[k], v) for k, v in load_file(b / "model.safetensors").items())
    assert load_shapes_policy(b).model.cfg == SMALL_UNET


def test_checksum_is_verified(tmp_path):
    out = pretrain(PretrainConfig(steps=1, batch_size=4, warmup_steps=1, threads=1), tmp_path / "ck", SMALL)
    verify_checksum(out)
    (out / "model.safetensors.sha256").write_text("0" * 64 + "  model.safetensors\n")
    with pytest.raises(ChecksumError, match="sha256"):
        load_shapes_policy(out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_shapes_policy(tmp_path / "nowhere")


def test_evaluate_curve_scores_every_saved_step(tmp_path):
    from harness.cli import main

    cfg = PretrainConfig(steps=2, batch_size=4, warmup_steps=1, threads=1, save_every=1)
    pretrain(cfg, tmp_path / "run", SMALL)
    assert main(["evaluate", "shapes", "--curve", str(tmp_path / "run"), "--steps", "1", "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "curve.csv").read_text().splitlines()
    assert rows[0].startswith("step,cfg,overall") and rows[0].endswith("extra_objects")
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]
    assert (tmp_path / "curve.png").is_file()


def test_committed_base_matches_its_checksum_and_config():
    verify_checksum(BASE_CHECKPOINT)
    meta = json.loads((BASE_CHECKPOINT / "config.json").read_text())
    recipe = {k: v for k, v in PretrainConfig().__dict__.items() if k != "save_every"}
    assert meta["pretrain"] == recipe  # `diffrl pretrain shapes` with its defaults reproduces it
    assert tuple(meta["architecture"]["vocabulary"]) == VOCABULARY
    assert meta["architecture"] == json.loads(json.dumps(asdict(BASE_ARCHITECTURE)))  # tuples as JSON lists


def test_distractors_change_the_training_scenes(tmp_path):
    plain = PretrainConfig(steps=2, batch_size=8, warmup_steps=2, threads=1)
    a = load_file(pretrain(plain, tmp_path / "a", SMALL) / "model.safetensors")
    b = load_file(pretrain(replace(plain, distractor_rate=2.0), tmp_path / "b", SMALL) / "model.safetensors")
    assert not all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DIFFRL_REPRODUCE"),
    reason="full pretraining (minutes to an hour on the CPU): set DIFFRL_REPRODUCE=1",
)
def test_pretraining_reproduces_the_committed_base(tmp_path):
    out = pretrain(PretrainConfig(), tmp_path / "base")
    assert (out / "model.safetensors.sha256").read_text() == (BASE_CHECKPOINT / "model.safetensors.sha256").read_text()


def test_caption_noise_replaces_captions_at_its_rate_and_draws_nothing_when_off():
    prompts = sample_prompts(np.random.default_rng(1), 4000)
    own = [md["prompt"] for md in prompts]
    rng = np.random.default_rng(2)
    clean = training_captions(prompts, rng, PretrainConfig(caption_noise=0.0, cond_dropout=0.0))
    assert clean == own
    untouched = np.random.default_rng(2)
    untouched.random(len(prompts))  # the dropout draw only
    assert rng.random() == untouched.random()
    noisy = training_captions(prompts, np.random.default_rng(3), PretrainConfig(caption_noise=0.5, cond_dropout=0.0))
    swapped = np.mean([a != b for a, b in zip(noisy, own, strict=True)])
    # A swap lands on the same prompt now and then (single_object has 4 prompts), so slightly under 0.5.
    assert 0.42 < swapped < 0.5
    dropped = training_captions(prompts, np.random.default_rng(4), PretrainConfig(caption_noise=0.5, cond_dropout=0.5))
    assert 0.45 < np.mean([c == "" for c in dropped]) < 0.55


def test_caption_noise_starts_after_its_clean_steps_and_the_clean_phase_matches_a_clean_run():
    prompts = sample_prompts(np.random.default_rng(1), 400)
    own = [md["prompt"] for md in prompts]
    staged = PretrainConfig(caption_noise=0.5, caption_noise_start=10, cond_dropout=0.0)
    clean_rng, staged_rng = np.random.default_rng(2), np.random.default_rng(2)
    clean = training_captions(prompts, clean_rng, PretrainConfig(caption_noise=0.0, cond_dropout=0.0), step=10)
    assert training_captions(prompts, staged_rng, staged, step=10) == clean == own
    assert staged_rng.random() == clean_rng.random()  # the same random stream up to the switch
    noisy = training_captions(prompts, np.random.default_rng(3), staged, step=11)
    assert 0.35 < np.mean([a != b for a, b in zip(noisy, own, strict=True)]) < 0.5


def test_staged_caption_noise_matches_the_clean_run_up_to_its_switch(tmp_path):
    clean = PretrainConfig(steps=2, batch_size=4, warmup_steps=2, caption_noise=0.0)
    staged = replace(clean, caption_noise=0.5, caption_noise_start=2)
    a = load_file(pretrain(clean, tmp_path / "clean", SMALL_UNET) / "model.safetensors")
    b = load_file(pretrain(staged, tmp_path / "staged", SMALL_UNET) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lr_warms_up_stays_then_cools_down_linearly():
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr_cooldown_steps=20)
    assert [lr_factor(s, cfg) for s in (0, 4, 9, 50, 79)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert [lr_factor(s, cfg) for s in (80, 90, 99)] == [1.0, 0.5, 0.05]  # the last step at 1/20
    assert lr_factor(99, PretrainConfig(steps=100, warmup_steps=10)) == 1.0  # no cooldown: constant


def test_attribute_noise_keeps_the_shape_classes_and_changes_only_attributes():
    prompts = sample_prompts(np.random.default_rng(1), 2000)
    cfg = PretrainConfig(caption_noise=0.5, caption_noise_scope="same_objects", cond_dropout=0.0)
    noisy = training_captions(prompts, np.random.default_rng(3), cfg)
    changed = 0
    for metadata, caption in zip(prompts, noisy, strict=True):
        parsed = parse_prompt(caption)
        assert {c["class"] for c in parsed["include"]} == {c["class"] for c in metadata["include"]}, caption
        changed += caption != metadata["prompt"]
    assert 0.4 < changed / len(prompts) < 0.5  # a swap lands on the same prompt now and then
    with pytest.raises(ValueError, match="caption_noise_scope must be one of 'any', 'same_objects'"):
        PretrainConfig(caption_noise_scope="nearby")


def test_a_stopped_run_resumes_bit_for_bit(tmp_path):
    cfg = PretrainConfig(steps=4, batch_size=4, warmup_steps=2, save_every=2)
    straight = load_file(pretrain(cfg, tmp_path / "straight", SMALL_UNET) / "model.safetensors")
    pretrain(replace(cfg, steps=2), tmp_path / "resumed", SMALL_UNET)  # stopped at step 2
    resumed = load_file(pretrain(cfg, tmp_path / "resumed", SMALL_UNET, resume=True) / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    with pytest.raises(ValueError, match=r"pretrain\.lr"):
        pretrain(replace(cfg, steps=6, lr=0.5), tmp_path / "resumed", SMALL_UNET, resume=True)
    with pytest.raises(ValueError, match="past steps=3"):
        pretrain(replace(cfg, steps=3), tmp_path / "resumed", SMALL_UNET, resume=True)


def test_a_run_saved_before_a_recipe_field_existed_resumes_under_its_default(tmp_path):
    cfg = PretrainConfig(steps=2, batch_size=4, warmup_steps=2)
    pretrain(replace(cfg, steps=1), tmp_path / "run", SMALL_UNET)
    state = torch.load(tmp_path / "run" / "resume.pt", weights_only=False)
    del state["key"]["pretrain"]["caption_noise_start"]  # as written before the field was added
    torch.save(state, tmp_path / "run" / "resume.pt")
    pretrain(cfg, tmp_path / "run", SMALL_UNET, resume=True)  # no mismatch
    with pytest.raises(ValueError, match=r"pretrain\.caption_noise_start"):
        pretrain(replace(cfg, steps=3, caption_noise_start=5), tmp_path / "run", SMALL_UNET, resume=True)


def test_a_run_in_its_lr_cooldown_resumes_only_at_its_own_length(tmp_path):
    cfg = PretrainConfig(steps=6, batch_size=4, warmup_steps=1, lr_cooldown_steps=2)
    pretrain(replace(cfg, steps=3), tmp_path / "run", SMALL_UNET)  # 3 of 3 steps: its cooldown began after step 1
    with pytest.raises(ValueError, match="resume it with --steps 3"):
        pretrain(cfg, tmp_path / "run", SMALL_UNET, resume=True)
    state = torch.load(tmp_path / "run" / "resume.pt", weights_only=False)
    assert (state["step"], state["steps"]) == (3, 3)
    state["steps"] = 10  # as if stopped at step 3 of a 10-step run: its cooldown (from step 8) had not begun
    torch.save(state, tmp_path / "run" / "resume.pt")
    pretrain(cfg, tmp_path / "run", SMALL_UNET, resume=True)  # 6 steps: cooldown from step 4, after the saved 3
