"""HPSv2: the raw cosine of a (tiny) open_clip model loaded from an HPS-layout checkpoint, open_clip's tokenizer."""

from __future__ import annotations

import pytest
import torch

from harness.types import Prompt, RewardError
from rewards._clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize
from rewards.hpsv2 import HPSv2
from tests.rewards.tiny_scorers import CLIP_IMAGE

PROMPTS = [Prompt("a red apple on a table"), Prompt("An astronaut’s glove with “NASA 2049”"), Prompt("two dogs")]
# The non-zero token ids that hpsv2x 1.2.0's ``hpsv2.src.open_clip.tokenizer.tokenize`` (the official scorer's)
# gives for PROMPTS, recorded from it; the package itself is no dependency (it pins pytest==7.2.0, protobuf<4).
HPSV2X_IDS = [
    [49406, 320, 736, 3055, 525, 320, 2175, 49407],
    [49406, 550, 18376, 568, 16078, 593, 257, 6841, 273, 271, 275, 280, 257, 49407],
    [49406, 1237, 3255, 49407],
]


def padded(ids: list[list[int]], length: int = 77) -> torch.Tensor:
    return torch.tensor([row + [0] * (length - len(row)) for row in ids])


def test_hps_is_the_raw_cosine_of_the_checkpoint_model(tiny_checkpoints):
    import open_clip

    options = tiny_checkpoints["hpsv2"]
    model = open_clip.create_model(options["architecture"], pretrained=None, output_dict=True).eval()
    model.load_state_dict(torch.load(options["checkpoint"], weights_only=True)["state_dict"])  # as hpsv2.score
    images = torch.rand(3, 3, CLIP_IMAGE, CLIP_IMAGE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(normalize(images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), padded(HPSV2X_IDS))
        expected = torch.diagonal(out["image_features"] @ out["text_features"].T)
    scores = HPSv2(**options)(images, PROMPTS)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert scores.abs().max() <= 1.0  # a cosine: no logit scale


def test_open_clip_tokenizer_gives_the_official_hpsv2x_ids():
    import open_clip

    tokenize = open_clip.get_tokenizer("ViT-H-14")  # what HPSv2() uses for its default architecture
    assert torch.equal(tokenize([p.text for p in PROMPTS]), padded(HPSV2X_IDS))
    long = tokenize(["word " * 100])  # truncated at 77 with EOT last, as hpsv2x's tokenize
    assert long.shape == (1, 77) and long[0, 0].item() == 49406 and long[0, -1].item() == 49407
    assert set(long[0, 1:-1].tolist()) == {2653}


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
