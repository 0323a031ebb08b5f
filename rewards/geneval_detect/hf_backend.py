"""GenEval's detector through transformers' ``Mask2FormerForUniversalSegmentation`` (the ``hf`` backend).

An approximation of the official detector: ``facebook/mask2former-swin-small-coco-instance`` is the
same architecture (Swin-S, 100 queries, COCO instance) but Detectron2's training run, not OpenMMLab's
checkpoint that GenEval uses, so scores will not match the ``mmdet`` backend exactly.

The pitfalls of ``post_process_instance_segmentation`` (``shared/reference/rewards.md`` §1.10) are
avoided by post-processing here, as mmdet's ``MaskFormerFusionHead`` does:

* no score threshold here (HF's default 0.5 would drop detections); the rule engine applies
  GenEval's 0.3 / 0.9 (strictly greater) itself;
* mask logits are upsampled bilinearly to the padded input, cropped to the resized image, and
  resized to the original image before binarising at logit > 0 (HF goes through a hard-coded
  384×384 grid and nearest upsampling);
* boxes are the tight boxes of the binary masks (HF returns none), as mmdet's ``mask2bbox``;
* labels are mapped by index to GenEval's ``object_names.txt``, after checking the checkpoint's
  ``id2label`` (COCO names; GenEval renames mouse, remote and keyboard);
* the input is resized to shortest edge 800 / longest 1333 and zero-padded to a multiple of 32,
  mmdet's test pipeline, whatever the checkpoint's ``preprocessor_config.json`` says (the
  processor's ``size_divisor`` would stretch the image to the multiple instead of padding it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from harness.types import RewardError
from rewards.geneval_detect.base import (
    GENEVAL_TO_COCO,
    ImageDetections,
    check_image,
    group_by_class,
    masks_to_boxes,
    package_version,
)

DEFAULT_HF_DETECTOR = "facebook/mask2former-swin-small-coco-instance"


@dataclass(frozen=True)
class InstancePredictions:
    """Post-processed predictions of one image: N instances, masks at the original image size."""

    labels: Tensor  # (N,) int64, 0-based class index
    boxes: Tensor  # (N, 4) float32, x1 y1 x2 y2
    scores: Tensor  # (N,) float32, class prob × mask score
    masks: Tensor  # (N, H, W) bool


def mask2former_instances(
    class_logits: Tensor,
    mask_logits: Tensor,
    padded_size: tuple[int, int],
    valid_size: tuple[int, int],
    original_size: tuple[int, int],
    max_per_image: int = 100,
) -> InstancePredictions:
    """mmdet's ``MaskFormerFusionHead.instance_postprocess`` on one image's raw Mask2Former outputs.

    ``class_logits`` (Q, C + 1), the last class being "no object"; ``mask_logits`` (Q, h, w) at
    any resolution of the padded input ``padded_size``; ``valid_size`` is the resized image inside
    the padding, ``original_size`` the input image (all (height, width)).

    Scores = softmax over classes without "no object", top ``max_per_image`` over (query, class)
    pairs, each × the mean sigmoid of its mask inside the mask (mask = logit > 0). There is no NMS.
    """
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    if mask_logits.ndim != 3 or mask_logits.shape[0] != num_queries:
        raise ValueError(f"mask_logits must be ({num_queries}, h, w), got {tuple(mask_logits.shape)}")
    if valid_size[0] > padded_size[0] or valid_size[1] > padded_size[1]:
        raise ValueError(f"valid size {valid_size} exceeds the padded input {padded_size}")
    masks = F.interpolate(mask_logits[None].float(), size=padded_size, mode="bilinear", align_corners=False)[0]
    masks = masks[:, : valid_size[0], : valid_size[1]]
    masks = F.interpolate(masks[None], size=original_size, mode="bilinear", align_corners=False)[0]

    probs = class_logits.float().softmax(dim=-1)[:, :-1]  # (Q, C)
    top_scores, top = probs.flatten().topk(min(max_per_image, probs.numel()), sorted=True)
    labels, queries = top % num_classes, torch.div(top, num_classes, rounding_mode="floor")
    chosen = masks[queries]  # (N, H, W) logits
    binary = chosen > 0
    mask_scores = (chosen.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return InstancePredictions(labels, masks_to_boxes(binary), top_scores * mask_scores, binary)


def check_label_map(id2label: Mapping[Any, str], class_names: Sequence[str]) -> None:
    """Raise :class:`RewardError` unless label ``i`` of the checkpoint is GenEval class ``i``.

    Accepted per index: GenEval's name or the COCO name it renames (mouse, remote, keyboard).
    """
    labels = {int(k): v for k, v in id2label.items()}
    if sorted(labels) != list(range(len(class_names))):
        raise RewardError(
            f"detector has {len(labels)} labels (ids {min(labels, default=None)}..{max(labels, default=None)}); "
            f"GenEval needs the {len(class_names)} COCO thing classes with ids 0..{len(class_names) - 1}"
        )
    wrong = [
        f"{i}: {labels[i]!r} (expected {name!r})"
        for i, name in enumerate(class_names)
        if labels[i] not in (name, GENEVAL_TO_COCO.get(name, name))
    ]
    if wrong:
        raise RewardError(
            "detector labels do not follow GenEval's object_names.txt order: "
            + "; ".join(wrong[:5])
            + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else "")
            + ". Pass check_labels=False only if you know the order matches."
        )


class HFMask2FormerDetector:
    """Mask2Former instance segmentation from transformers (the ``hf`` backend; see the module docstring).

    ``model_path`` is a hub id or a local folder holding the model and its image-processor config;
    ``rgb_as_bgr=True`` swaps the channels before detection, reproducing what the FlowGRPO /
    DiffusionNFT reward code feeds mmdet (RGB arrays read as BGR).
    """

    name = "hf"

    def __init__(
        self,
        class_names: Sequence[str],
        model_path: str | Path = DEFAULT_HF_DETECTOR,
        device: str = "cpu",
        batch_size: int = 4,
        rgb_as_bgr: bool = False,
        shortest_edge: int = 800,
        longest_edge: int = 1333,
        size_divisor: int = 32,
        max_per_image: int = 100,
        check_labels: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.class_names = tuple(class_names)
        self.model_path, self.device, self.batch_size, self.rgb_as_bgr = str(model_path), device, batch_size, rgb_as_bgr
        self.size = {"shortest_edge": shortest_edge, "longest_edge": longest_edge}
        self.size_divisor, self.max_per_image, self.check_labels = size_divisor, max_per_image, check_labels
        self.version = f"transformers-{package_version('transformers', '`pip install transformers`')}:{self.model_path}"
        self._model: Any = None
        self._processor: Any = None

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

            model: Any = Mask2FormerForUniversalSegmentation.from_pretrained(self.model_path)
            if self.check_labels:
                check_label_map(model.config.id2label or {}, self.class_names)
            self._processor = AutoImageProcessor.from_pretrained(self.model_path)
            self._model = model.to(self.device).eval()
        return self._model, self._processor

    def preprocess(self, images: Sequence[np.ndarray]) -> dict[str, Tensor]:
        """mmdet's test pipeline: keep-ratio resize, ImageNet normalisation, zero padding to a multiple of 32.

        Returns ``pixel_values`` (B, 3, H, W) and ``pixel_mask`` (B, H, W), 1 on the resized image.
        The processor's own ``size_divisor`` is not used: it *stretches* the resized image to a
        multiple of the divisor, where mmdet pads it.
        """
        _, processor = self._load()
        arrays = [np.ascontiguousarray(im[:, :, ::-1]) if self.rgb_as_bgr else im for im in images]
        inputs = processor(images=arrays, size=self.size, size_divisor=0, do_resize=True, return_tensors="pt")
        pixel_values, pixel_mask = inputs["pixel_values"], inputs["pixel_mask"]
        height, width = pixel_values.shape[-2:]
        pad_h, pad_w = (-height) % self.size_divisor, (-width) % self.size_divisor
        return {
            "pixel_values": F.pad(pixel_values, (0, pad_w, 0, pad_h), value=0.0),
            "pixel_mask": F.pad(pixel_mask, (0, pad_w, 0, pad_h), value=0),
        }

    @torch.no_grad()
    def detect(self, images: Sequence[np.ndarray], min_score: float = 0.0) -> list[ImageDetections]:
        """Per image, ``{class name: [Instance, ...]}``: the top ``max_per_image`` predictions above ``min_score``."""
        for i, image in enumerate(images):
            check_image(image, f"image {i}")
        model, _ = self._load()
        results: list[ImageDetections] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            inputs = self.preprocess(chunk)
            pixel_values, pixel_mask = inputs["pixel_values"].to(self.device), inputs["pixel_mask"].to(self.device)
            outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
            padded = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
            for i, image in enumerate(chunk):
                valid = (int(pixel_mask[i].any(dim=1).sum()), int(pixel_mask[i].any(dim=0).sum()))
                pred = mask2former_instances(
                    outputs.class_queries_logits[i],
                    outputs.masks_queries_logits[i],
                    padded,
                    valid,
                    (image.shape[0], image.shape[1]),
                    self.max_per_image,
                )
                results.append(
                    group_by_class(
                        pred.labels.tolist(),
                        pred.boxes.cpu().numpy(),
                        pred.scores.tolist(),
                        list(pred.masks.cpu().numpy()),
                        self.class_names,
                        min_score,
                        self.name,
                    )
                )
        return results
