"""HPSv2: the raw cosine of a (tiny) open_clip model loaded from an HPS-layout checkpoint."""

from __future__ import annotations

import pytest
import torch

from harness.types import Prompt, RewardError
from rewards._clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize
from rewards.hpsv2 import HPSv2, hps_tokenizer
from tests.rewards.tiny_scorers import CLIP_IMAGE

PROMPTS = [Prompt("a red apple on a table"), Prompt("An astronaut’s glove with “NASA 2049”"), Prompt("two dogs")]


def test_hps_is_the_raw_cosine_of_the_checkpoint_model(tiny_checkpoints):
    import open_clip

    options = tiny_checkpoints["hpsv2"]
    model = open_clip.create_model(options["architecture"], pretrained=None, output_dict=True).eval()
    model.load_state_dict(torch.load(options["checkpoint"], weights_only=True)["state_dict"])  # as hpsv2.score
    images = torch.rand(3, 3, CLIP_IMAGE, CLIP_IMAGE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(
            normalize(images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), hps_tokenizer("hpsv2x")([p.text for p in PROMPTS])
        )
        expected = torch.diagonal(out["image_features"] @ out["text_features"].T)
    scores = HPSv2(**options)(images, PROMPTS)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert scores.abs().max() <= 1.0  # a cosine: no logit scale


def test_hpsv2x_and_open_clip_tokenizers_agree(tiny_checkpoints):
    texts = [p.text for p in PROMPTS] + ["word " * 100]  # and truncation at 77 with EOT last
    official, ours = hps_tokenizer("hpsv2x")(texts), hps_tokenizer("open_clip")(texts)
    assert official.shape == (4, 77) and torch.equal(official, ours)
    assert official[0, 0].item() == 49406 and official[3, -1].item() == 49407


def test_non_square_images_are_padded_not_cropped(tiny_checkpoints):
    reward = HPSv2(**tiny_checkpoints["hpsv2"])
    model, _ = reward.load()
    tall = torch.rand(1, 3, 64, 32)
    pixels = reward.preprocess(tall, model)
    assert pixels.shape == (1, 3, CLIP_IMAGE, CLIP_IMAGE)
    zero = normalize(torch.zeros(1, 3, 1, 1), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    torch.testing.assert_close(pixels[..., :, :8], zero.expand(1, 3, 32, 8))  # 8 padded columns each side


def test_a_checkpoint_for_another_architecture_is_a_clear_error(tiny_checkpoints, tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, bad)
    with pytest.raises(RewardError, match="does not fit open_clip HPS-Tiny-Test"):
        HPSv2(checkpoint=str(bad), architecture="HPS-Tiny-Test")(torch.rand(1, 3, 32, 32), PROMPTS[:1])
    with pytest.raises(RewardError, match="not an open_clip model config"):
        HPSv2(checkpoint=tiny_checkpoints["hpsv2"]["checkpoint"], architecture="ViT-Nope")(
            torch.rand(1, 3, 32, 32), PROMPTS[:1]
        )
    with pytest.raises(ValueError, match="tokenizer must be"):
        HPSv2(tokenizer="bpe")  # type: ignore[arg-type]
