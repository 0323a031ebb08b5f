"""Every learned reward, through the registry and its real loading path on tiny checkpoints.

Shape (B,), finite, deterministic, batch-size invariant, lazy loading, gradients where declared,
clear errors for missing paths and uncached hub ids.
"""

from __future__ import annotations

import os

import pytest
import torch

from harness.types import Prompt, Reward, RewardError, check_scores
from rewards import REWARDS

LEARNED = ["pickscore", "hpsv2", "clipscore", "aesthetic", "imagereward"]
PROMPTS = [Prompt("a red apple on a table"), Prompt("a photo of a cat"), Prompt("two dogs"), Prompt("a sign, open")]


def batch(n: int = 4, size: tuple[int, int] = (48, 40), seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=LEARNED)
def key(request: pytest.FixtureRequest) -> str:
    return request.param


def test_scores_have_shape_b_are_finite_and_deterministic(key, tiny_checkpoints):
    reward = REWARDS.get(key)(**tiny_checkpoints[key])
    assert isinstance(reward, Reward) and reward.spec.name == key
    images = batch()
    first = reward(images, PROMPTS)
    assert first.shape == (4,) and first.dtype == torch.float32 and first.device.type == "cpu"
    check_scores(key, first, 4)
    assert torch.equal(first, reward(images, PROMPTS))
    assert first.std() > 0  # different images/prompts, different scores: the model is really used


def test_batch_size_does_not_change_scores(key, tiny_checkpoints):
    images = batch(5)
    prompts = (PROMPTS * 2)[:5]
    whole = REWARDS.get(key)(**tiny_checkpoints[key], batch_size=16)(images, prompts)
    pieces = REWARDS.get(key)(**tiny_checkpoints[key], batch_size=2)(images, prompts)
    torch.testing.assert_close(whole, pieces, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_the_pixels_when_declared(key, tiny_checkpoints):
    reward = REWARDS.get(key)(**tiny_checkpoints[key])
    assert reward.spec.differentiable  # all five are: tensor preprocessing, no PIL, no no_grad
    images = batch(2).requires_grad_(True)
    reward(images, PROMPTS[:2]).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0


def test_no_graph_without_requires_grad(key, tiny_checkpoints):
    scores = REWARDS.get(key)(**tiny_checkpoints[key])(batch(2), PROMPTS[:2])
    assert not scores.requires_grad


def test_weights_load_lazily_on_first_call(key):
    missing = {
        "pickscore": {"model": "/nonexistent/pickscore", "processor": "/nonexistent/pickscore"},
        "clipscore": {"model": "/nonexistent/clip"},
        "aesthetic": {"model": "/nonexistent/clip"},
        "hpsv2": {"checkpoint": "/nonexistent/HPS_v2.1_compressed.pt"},
        "imagereward": {"checkpoint": "/nonexistent/ImageReward.pt", "med_config": "/nonexistent/med_config.json"},
    }[key]
    reward = REWARDS.get(key)(**missing)  # constructing touches no file
    with pytest.raises(RewardError, match=r"/nonexistent/.*no such (file|directory)"):
        reward(batch(1), PROMPTS[:1])


def test_uncached_hub_id_offline_says_how_to_pass_a_local_path(key, tiny_checkpoints):
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("needs HF_HUB_OFFLINE=1 (tests/conftest.py sets it)")
    options = dict(tiny_checkpoints[key])
    field = {"pickscore": "model", "clipscore": "model", "aesthetic": "mlp", "hpsv2": "checkpoint"}.get(
        key, "tokenizer"
    )
    options[field] = "diffrl-test-nobody/not-a-cached-repo" + ("/weights.pt" if field in ("mlp", "checkpoint") else "")
    with pytest.raises(RewardError, match=rf"HF_HUB_OFFLINE=1.*pass the (local directory|file) as {field}="):
        REWARDS.get(key)(**options)(batch(1), PROMPTS[:1])


def test_default_checkpoints_are_the_official_ones():
    defaults = {
        "pickscore": {
            "model_ref": "yuvalkirstain/PickScore_v1",
            "processor_ref": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        },
        "clipscore": {"model_ref": "openai/clip-vit-large-patch14", "processor_ref": "openai/clip-vit-large-patch14"},
        "aesthetic": {"model_ref": "openai/clip-vit-large-patch14"},
        "hpsv2": {"checkpoint": "xswu/HPSv2/HPS_v2.1_compressed.pt", "architecture": "ViT-H-14"},
        "imagereward": {"checkpoint": "THUDM/ImageReward/ImageReward.pt", "tokenizer_ref": "bert-base-uncased"},
    }
    for key, expected in defaults.items():
        reward = REWARDS.get(key)()
        assert {attribute: getattr(reward, attribute) for attribute in expected} == expected, key


def test_wrong_inputs_are_errors(tiny_checkpoints):
    reward = REWARDS.get("clipscore")(**tiny_checkpoints["clipscore"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(batch(2), PROMPTS[:1])
    with pytest.raises(RewardError, match=r"shape \(B, 3, H, W\)"):
        reward(torch.rand(2, 1, 8, 8), PROMPTS[:2])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        REWARDS.get("clipscore")(batch_size=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        REWARDS.get("pickscore")(dtype="fp32")
