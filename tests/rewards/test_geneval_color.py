"""GenEval's colour classifier: the #999 composite and crop by hand, the template/argmax logic with fake
embeddings, and a tiny random CLIP loaded back from disk through the real transformers path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness.geneval_rules import GENEVAL_COLORS
from harness.types import RewardError
from rewards.geneval_detect.base import Instance
from rewards.geneval_detect.color import (
    COLOR_TEMPLATES,
    ClipColorClassifier,
    HFClipEncoder,
    OpenClipEncoder,
    color_texts,
    color_weights,
    composite_and_crop,
    make_color_classifier,
    predict_colors,
)
from tests.rewards.geneval_fakes import PALETTE, paint, save_tiny_open_clip
from tests.rewards.tiny_scorers import save_tiny_clip

# --- composite and crop ----------------------------------------------------------------------------


def small_image():
    """3×4 image: R = 10·row + col, G = R + 100, B = 50."""
    red = np.array([[0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23]], dtype=np.uint8)
    return np.stack([red, red + 100, np.full_like(red, 50)], axis=-1)


def test_composite_over_999_grey_then_crop_to_the_box():
    mask = np.zeros((3, 4), dtype=bool)
    mask[0, 1] = mask[1, 1] = mask[1, 2] = mask[2, 3] = True
    crop = np.asarray(composite_and_crop(small_image(), (1, 0, 3, 2), mask))  # cols 1..2, rows 0..1
    assert crop[..., 0].tolist() == [[1, 153], [11, 12]]
    assert crop[..., 1].tolist() == [[101, 153], [111, 112]]
    assert crop[..., 2].tolist() == [[50, 153], [50, 50]]


def test_composite_without_crop_and_crop_without_mask():
    mask = np.zeros((3, 4), dtype=bool)
    mask[2, 3] = True
    whole = np.asarray(composite_and_crop(small_image(), (0, 0, 1, 1), mask, crop=False))
    assert whole.shape == (3, 4, 3) and whole[2, 3].tolist() == [23, 123, 50] and whole[0, 0].tolist() == [153] * 3
    unmasked = np.asarray(composite_and_crop(small_image(), (2, 1, 4, 3), None))
    assert unmasked[..., 0].tolist() == [[12, 13], [22, 23]]
    # PIL rounds fractional boxes: (0.6, 0.4, 2.4, 1.6) → (1, 0, 2, 2), as in the official ImageCrops.
    assert np.asarray(composite_and_crop(small_image(), (0.6, 0.4, 2.4, 1.6), None))[..., 0].tolist() == [[1], [11]]
    other = np.asarray(composite_and_crop(small_image(), (0, 0, 2, 2), np.ones((3, 4), bool), background=(0, 0, 9)))
    assert other[..., 0].tolist() == [[0, 1], [10, 11]]


def test_bad_masks_and_empty_boxes_are_errors():
    with pytest.raises(ValueError, match="mask shape \\(4, 4\\) does not match image shape \\(3, 4\\)"):
        composite_and_crop(small_image(), (0, 0, 2, 2), np.ones((4, 4), bool))
    with pytest.raises(RewardError, match="empty crop"):
        composite_and_crop(small_image(), (2, 1, 2, 3), None)


# --- templates, weights, argmax --------------------------------------------------------------------


def test_texts_are_colour_major_with_the_three_official_templates():
    texts = color_texts("fire hydrant")
    assert len(texts) == 30 and len(COLOR_TEMPLATES) == 3
    assert texts[:4] == [
        "a photo of a red fire hydrant",
        "a photo of a red-colored fire hydrant",
        "a photo of a red object",
        "a photo of a orange fire hydrant",
    ]
    assert texts[-1] == "a photo of a white object"


def test_weights_normalise_average_and_renormalise_then_argmax_of_cosine():
    text = torch.tensor([[3.0, 0.0], [0.0, 5.0], [0.0, 2.0], [0.0, 1.0]])  # colour 0: 2 templates; colour 1: 2
    weights = color_weights(text, num_colors=2)
    s = 2**-0.5
    assert weights.tolist() == [pytest.approx([s, 0.0]), pytest.approx([s, 1.0])]
    # [1, 0]: cos 0.707 vs 0 → colour 0; [0.1, 1]: 100·(0.0995·s + 0.995·s) = 77.4 vs 99.5 → colour 1.
    images = torch.tensor([[1.0, 0.0], [0.1, 1.0], [10.0, 100.0]])
    assert predict_colors(images, weights).tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="text features"):
        color_weights(torch.zeros(5, 2), num_colors=2)


class OneHotEncoder:
    """Texts → one-hot of the colour word they contain; crops → one-hot of the nearest palette colour."""

    name = "onehot"

    def __init__(self) -> None:
        self.texts: list[list[str]] = []
        self.crop_sizes: list[tuple[int, int]] = []

    def encode_text(self, texts):
        self.texts.append(list(texts))
        out = torch.zeros(len(texts), len(GENEVAL_COLORS))
        for i, text in enumerate(texts):
            color = next(c for c in GENEVAL_COLORS if f" {c} " in f" {text.replace('-colored', ' ')} ")
            out[i, GENEVAL_COLORS.index(color)] = 1.0
        return out

    def encode_images(self, images):
        out = torch.zeros(len(images), len(GENEVAL_COLORS))
        for i, image in enumerate(images):
            self.crop_sizes.append(image.size)
            mean = np.asarray(image).reshape(-1, 3).mean(0)
            nearest = min(PALETTE, key=lambda c: float(np.sum((np.array(PALETTE[c]) - mean) ** 2)))
            out[i, GENEVAL_COLORS.index(nearest)] = 1.0
        return out


def test_classifier_crops_each_instance_and_caches_one_classifier_per_class():
    image, found = paint([("car", (0, 0, 10, 6), "blue", 0.9), ("car", (20, 20, 30, 40), "pink", 0.8)])
    encoder = OneHotEncoder()
    classifier = ClipColorClassifier(encoder)
    assert classifier.classify(image, found["car"], "car") == ["blue", "pink"]
    assert encoder.crop_sizes == [(10, 6), (10, 20)]
    classifier.classify(image, found["car"][:1], "car")
    assert len(encoder.texts) == 1 and encoder.texts[0] == color_texts("car")  # cached per class
    assert classifier.classify(image, [], "bench") == [] and len(encoder.texts) == 1
    classifier.classify(image, found["car"], "bench")
    assert len(encoder.texts) == 2 and encoder.texts[1][0] == "a photo of a red bench"


def test_the_mask_decides_what_the_classifier_sees():
    image, found = paint([("car", (0, 0, 20, 20), "green", 0.9)])
    image[0:20, 10:20] = PALETTE["red"]  # the right half of the box is red but outside the mask
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[0:20, 0:10] = True
    only_green = Instance((0, 0, 20, 20), 0.9, mask)
    assert ClipColorClassifier(OneHotEncoder(), background=PALETTE["green"]).classify(image, [only_green], "car") == [
        "green"
    ]


# --- a tiny CLIP through the real loading path -----------------------------------------------------


def test_tiny_clip_loads_from_disk_and_classifies_masked_crops(tmp_path):
    path = save_tiny_clip(tmp_path / "clip")
    encoder = HFClipEncoder(path, batch_size=2)
    classifier = ClipColorClassifier(encoder)
    image, found = paint(
        [("car", (0, 0, 10, 6), "blue", 0.9), ("car", (20, 20, 30, 40), "red", 0.8), ("car", (40, 2, 60, 9), None, 0.7)]
    )
    colors = classifier.classify(image, found["car"], "car")
    assert len(colors) == 3 and set(colors) <= set(GENEVAL_COLORS)
    weights = classifier.weights("car")
    assert weights.shape == (16, 10) and torch.allclose(weights.norm(dim=0), torch.ones(10), atol=1e-5)
    # The encoder's image features are the model's projected embeddings of the processed crop.
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    crop = composite_and_crop(image, found["car"][0].box, found["car"][0].mask)
    with torch.no_grad():
        direct = model.get_image_features(pixel_values=processor(images=[crop], return_tensors="pt")["pixel_values"])
    direct = direct if isinstance(direct, torch.Tensor) else direct.pooler_output
    assert torch.allclose(encoder.encode_images([crop]), direct, atol=1e-5)
    assert encoder.encode_text(["a photo of a red car", "a photo of a red object"]).shape == (2, 16)
    assert isinstance(crop, Image.Image)


def test_tiny_open_clip_loads_its_saved_weights_and_classifies(tmp_path):
    import open_clip

    original = save_tiny_open_clip(tmp_path / "oc")
    torch.manual_seed(123)  # a fresh random init would differ: the encoder must load the saved weights
    encoder = OpenClipEncoder.from_path(tmp_path / "oc", batch_size=2)
    assert encoder.model_name == f"local-dir:{tmp_path / 'oc'}" and encoder.pretrained is None
    texts = color_texts("car")[:3]
    with torch.no_grad():
        expected = original.encode_text(open_clip.get_tokenizer(encoder.model_name)(texts))
    assert torch.allclose(encoder.encode_text(texts), expected, atol=1e-5)
    image, found = paint([("car", (0, 0, 10, 6), "blue", 0.9), ("car", (20, 20, 30, 40), "red", 0.8)])
    colors = make_color_classifier("open_clip", tmp_path / "oc").classify(image, found["car"], "car")
    assert len(colors) == 2 and set(colors) <= set(GENEVAL_COLORS)


def test_open_clip_defaults_to_openai_vit_l_14_with_quick_gelu(tmp_path):
    default = OpenClipEncoder.from_path(None)
    assert (default.model_name, default.pretrained, default.quick_gelu) == ("ViT-L-14", "openai", True)
    (tmp_path / "vit-l-14.pt").write_bytes(b"")
    from_file = OpenClipEncoder.from_path(tmp_path / "vit-l-14.pt")
    assert from_file.pretrained == str(tmp_path / "vit-l-14.pt") and from_file.quick_gelu
    with pytest.raises(RewardError, match="neither a folder nor a checkpoint file"):
        OpenClipEncoder.from_path(tmp_path / "missing")
    assert make_color_classifier().name == "hf-clip:openai/clip-vit-large-patch14"
    with pytest.raises(ValueError, match="unknown CLIP backend 'clip'"):
        make_color_classifier("clip")
