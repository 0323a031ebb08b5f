"""Test doubles for the GenEval reward: a scripted detector, a palette colour classifier, painted images,
and tiny random-weight Mask2Former / CLIP models saved the way real checkpoints are."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rewards.geneval_detect.base import GENEVAL_TO_COCO, ImageDetections, Instance
from rewards.geneval_detect.color import composite_and_crop

PALETTE = {  # one distinct paint per GenEval colour
    "red": (220, 20, 20),
    "orange": (255, 140, 0),
    "yellow": (230, 230, 20),
    "green": (20, 200, 20),
    "blue": (20, 20, 220),
    "purple": (130, 20, 160),
    "pink": (255, 160, 200),
    "brown": (120, 70, 20),
    "black": (5, 5, 5),
    "white": (250, 250, 250),
}
BACKDROP = (60, 90, 120)


class ScriptedDetector:
    """Returns pre-set detections, one entry per image, in call order; records what it was asked."""

    name = "fake"
    version = "0"

    def __init__(self, outputs: Sequence[ImageDetections]) -> None:
        self.outputs = list(outputs)
        self.calls: list[tuple[int, float]] = []

    def detect(self, images: Sequence[np.ndarray], min_score: float = 0.0) -> list[ImageDetections]:
        self.calls.append((len(images), min_score))
        taken, self.outputs = self.outputs[: len(images)], self.outputs[len(images) :]
        return taken


class PaletteColors:
    """Names the palette colour nearest to the mean of each instance's masked crop (uses the real crop code)."""

    name = "palette"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def classify(self, image: np.ndarray, instances: Sequence[Instance], classname: str) -> list[str]:
        self.calls.append((classname, len(instances)))
        names = []
        for inst in instances:
            mean = np.asarray(composite_and_crop(image, inst.box, inst.mask)).reshape(-1, 3).mean(0)
            names.append(min(PALETTE, key=lambda c: float(np.sum((np.array(PALETTE[c]) - mean) ** 2))))
        return names


def paint(objects: Sequence[tuple[str, tuple[int, int, int, int], str | None, float]], size: int = 64):
    """An image with one filled rectangle per object, and the matching detections.

    ``objects``: (class, (x1, y1, x2, y2), colour or None, score); the mask is the rectangle, the box its tight box.
    """
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKDROP
    detections: ImageDetections = {}
    for cls, (x1, y1, x2, y2), color, score in objects:
        mask = np.zeros((size, size), dtype=bool)
        mask[y1:y2, x1:x2] = True
        if color is not None:
            image[mask] = PALETTE[color]
        detections.setdefault(cls, []).append(Instance((x1, y1, x2, y2), score, mask))
    return image, detections


def coco_id2label(class_names: Sequence[str]) -> dict[int, str]:
    """The id2label of a COCO-instance checkpoint: GenEval's names with the three COCO originals restored."""
    return {i: GENEVAL_TO_COCO.get(name, name) for i, name in enumerate(class_names)}


def save_tiny_mask2former(path: Path, class_names: Sequence[str], id2label: dict[int, str] | None = None) -> Path:
    """A random-weight Mask2Former (tiny Swin backbone, width 32 for its GroupNorm(32), 10 queries).

    Its image processor is saved at 384 px, as converted hub checkpoints are, so tests can check the override.
    """
    import torch
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    torch.manual_seed(0)
    labels = id2label if id2label is not None else coco_id2label(class_names)
    backbone = SwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        encoder_layers=1,
        decoder_layers=3,
        num_attention_heads=2,
        dim_feedforward=32,
        num_queries=10,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    Mask2FormerForUniversalSegmentation(config).save_pretrained(path)
    Mask2FormerImageProcessor(size={"shortest_edge": 384, "longest_edge": 384}, size_divisor=32).save_pretrained(path)
    return path


def save_tiny_open_clip(path: Path):
    """A random-weight open_clip model (QuickGELU, 32 px, 16-dim) as a ``local-dir:`` folder; returns the model."""
    import json

    import open_clip
    import torch

    path.mkdir(parents=True)
    config = {
        "model_cfg": {
            "embed_dim": 16,
            "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        }
    }
    (path / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{path}", pretrained=None).eval()
    torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")
    return model
