"""PickScore, CLIP score and Aesthetic: scales against independent computations; the tensor preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from harness.types import Prompt, RewardError
from rewards._clip import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CropTransform,
    center_crop,
    resize_longest_and_pad,
    resize_shortest_edge,
)
from rewards.aesthetic import Aesthetic
from rewards.clipscore import CLIPScore
from rewards.pickscore import PickScore
from tests.rewards.tiny_scorers import CLIP_IMAGE

PROMPTS = [Prompt("a red apple on a table"), Prompt("a photo of a cat"), Prompt("two dogs playing")]


def uint8_images(n: int = 3, size: int = CLIP_IMAGE, seed: int = 0) -> torch.Tensor:
    """Images on the uint8 grid, at the model's size: the processor's PIL path then sees exactly these pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255


def official_inputs(clip_dir: str, images: torch.Tensor, prompts: list[Prompt], padding):
    """The official route: ``CLIPProcessor`` on PIL images and texts, ``CLIPModel`` from the same folder."""
    from transformers import AutoModel, AutoProcessor

    processor, model = AutoProcessor.from_pretrained(clip_dir), AutoModel.from_pretrained(clip_dir).eval()
    pil = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in images]
    pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
    text = processor(
        text=[p.text for p in prompts], padding=padding, truncation=True, max_length=77, return_tensors="pt"
    )
    return model, pixels, text


def features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_pickscore_is_logit_scale_times_cosine_over_26(tiny_checkpoints):
    options = tiny_checkpoints["pickscore"]
    images = uint8_images()
    model, pixels, text = official_inputs(options["model"], images, PROMPTS, padding=True)
    with torch.no_grad():
        img = features(model.get_image_features(pixel_values=pixels))
        txt = features(model.get_text_features(**text))
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        expected = (model.logit_scale.exp() * txt @ img.T).diag() / 26
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-4)  # random init, not 100
    torch.testing.assert_close(PickScore(**options)(images, PROMPTS), expected, rtol=1e-4, atol=1e-5)


def test_clipscore_is_diffusionnft_logits_over_100(tiny_checkpoints):
    options = tiny_checkpoints["clipscore"]
    images = uint8_images()
    model, pixels, text = official_inputs(options["model"], images, PROMPTS, padding="max_length")
    with torch.no_grad():
        expected = model(pixel_values=pixels, **text).logits_per_image.diagonal() / 100
    scores = CLIPScore(**options)(images, PROMPTS)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    # With OpenAI's exp(logit_scale) = 100 this is the cosine; here (14.29) it is 0.1429 * cos.
    assert scores.abs().max() <= model.logit_scale.exp().item() / 100 + 1e-6


def test_aesthetic_is_the_mlp_on_the_normalised_image_embedding(tiny_checkpoints):
    options = tiny_checkpoints["aesthetic"]
    images = uint8_images()
    model, pixels, _ = official_inputs(options["model"], images, PROMPTS, padding=True)
    state = torch.load(options["mlp"], weights_only=True)
    with torch.no_grad():
        x = features(model.get_image_features(pixel_values=pixels))
        x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        for index in (0, 2, 4, 6, 7):  # linear layers only; dropouts are identity in eval
            x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    reward = Aesthetic(**options)
    scores = reward(images, PROMPTS)
    torch.testing.assert_close(scores, x.squeeze(1), rtol=1e-4, atol=1e-5)
    assert torch.equal(scores, reward(images, [Prompt("anything else")] * 3))  # the prompt is not used


def test_aesthetic_rejects_a_wrong_mlp_file(tiny_checkpoints, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, bad)
    reward = Aesthetic(model=tiny_checkpoints["aesthetic"]["model"], mlp=str(bad))
    with pytest.raises(RewardError, match="not an aesthetic-MLP state dict for 16-d"):
        reward(uint8_images(1), PROMPTS[:1])


def test_resize_and_crop_match_torchvision_on_tensors():
    """DiffusionNFT's CLIP-score transform is torchvision Resize(size) → CenterCrop → Normalize on tensors."""
    g = torch.Generator().manual_seed(0)
    images = 0.3 + 0.4 * torch.rand(2, 3, 48, 72, generator=g)  # smooth range: no clamping at 0 or 1
    reference = T.Compose(
        [T.Resize(32, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(32),
         T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    )  # fmt: skip
    ours = CropTransform(size=32, crop=(32, 32))
    torch.testing.assert_close(ours(images), reference(images), rtol=1e-5, atol=1e-5)
    assert resize_shortest_edge(images, 32).shape[-2:] == (32, 48)
    assert center_crop(torch.arange(25.0).view(1, 1, 5, 5), 3, 3).flatten().tolist()[:3] == [6.0, 7.0, 8.0]


def test_resize_longest_and_pad_is_hpsv2s_resize_max_size():
    images = 0.3 + 0.4 * torch.rand(1, 3, 40, 64, generator=torch.Generator().manual_seed(1))
    out = resize_longest_and_pad(images, 32)  # 40×64 → 20×32, then 6 rows of zeros above and below
    assert out.shape == (1, 3, 32, 32)
    assert out[..., :6, :].abs().max() == 0 and out[..., 26:, :].abs().max() == 0
    resized = T.functional.resize(images, [20, 32], interpolation=T.InterpolationMode.BICUBIC, antialias=True)
    torch.testing.assert_close(out[..., 6:26, :], resized, rtol=1e-5, atol=1e-5)
    square = torch.rand(1, 3, 32, 32)
    assert torch.equal(resize_longest_and_pad(square, 32), square)  # hpsv2: scale 1 → untouched


def test_processor_transform_is_read_from_the_saved_processor(tiny_checkpoints):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoints["clipscore"]["model"])
    transform = CropTransform.from_image_processor(processor.image_processor)
    assert transform == CropTransform(size=CLIP_IMAGE, crop=(CLIP_IMAGE, CLIP_IMAGE))
    assert np.allclose(transform.mean, OPENAI_CLIP_MEAN) and np.allclose(transform.std, OPENAI_CLIP_STD)


def test_an_existing_but_incomplete_directory_is_named_in_the_error(tiny_checkpoints, tmp_path):
    reward = PickScore(model=str(tmp_path), processor=tiny_checkpoints["pickscore"]["processor"])
    with pytest.raises(RewardError, match=r"model='.*' is a local path but could not be loaded from it"):
        reward(uint8_images(1), PROMPTS[:1])
