"""The detector interface of the GenEval reward: image → per-class instances (box, score, mask).

GenEval (djghosh13/geneval, ``evaluation/evaluate_images.py``) reads mmdetection 2.x's
Mask2Former output as 80 per-class lists, class ``i`` being line ``i`` of ``object_names.txt``.
Every backend here returns that shape, keyed by GenEval's class names:
``{class name: [Instance(box, score, mask), ...]}`` for each image, so the rule engine
(:mod:`harness.geneval_rules`) never sees which backend made them; the backend's :attr:`Detector.name`
and :attr:`Detector.version` are recorded next to every result instead.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from harness.types import RewardError

BackendName = Literal["mmdet", "hf"]
Box = tuple[float, float, float, float]

# GenEval renames three COCO classes in object_names.txt; checkpoints label them with the COCO names.
GENEVAL_TO_COCO = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}


@dataclass(frozen=True, eq=False)
class Instance:
    """One detected object instance.

    ``box`` = (x1, y1, x2, y2) in pixels of the input image (x2, y2 exclusive when made from a mask,
    as mmdet's ``mask2bbox``); ``score`` = the detector's confidence; ``mask`` = (H, W) bool at the
    input image's size, or ``None`` when the backend gives no mask (colour is then judged on the box).
    """

    box: Box
    score: float
    mask: np.ndarray | None = None


ImageDetections = dict[str, list[Instance]]


class Detector(Protocol):
    """Finds GenEval's 80 object classes in RGB uint8 images (H, W, 3); loads its model on first use."""

    name: str
    version: str

    def detect(self, images: Sequence[np.ndarray], min_score: float = 0.0) -> list[ImageDetections]:
        """Per image, the instances with score strictly above ``min_score``, keyed by class name."""
        ...


def package_version(distribution: str, extra_hint: str) -> str:
    """The installed version of ``distribution``, or a :class:`RewardError` saying how to install it."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise RewardError(
            f"GenEval detector needs the package {distribution!r}; install it with {extra_hint}"
        ) from None


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight boxes of binary masks (N, H, W) → (N, 4) float32, mmdet's ``mask2bbox``.

    ``x1, y1`` = first column/row with a pixel set, ``x2, y2`` = last one + 1; an empty mask gets
    the box (0, 0, 0, 0).
    """
    if masks.ndim != 3:
        raise ValueError(f"expected masks of shape (N, H, W), got {tuple(masks.shape)}")
    masks = masks.bool()
    boxes = torch.zeros((masks.shape[0], 4), dtype=torch.float32, device=masks.device)
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # (N, W), (N, H)
    for i in range(masks.shape[0]):
        xs, ys = torch.nonzero(cols[i]).flatten(), torch.nonzero(rows[i]).flatten()
        if len(xs) and len(ys):
            boxes[i] = torch.stack([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]).float()
    return boxes


def check_image(image: np.ndarray, where: str) -> None:
    """Raise ``ValueError`` unless ``image`` is an RGB uint8 array (H, W, 3)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{where}: expected an RGB uint8 array (H, W, 3), got {got}")


def group_by_class(
    labels: Sequence[int],
    boxes: Sequence[Sequence[float]] | np.ndarray,
    scores: Sequence[float],
    masks: Sequence[np.ndarray] | None,
    class_names: Sequence[str],
    min_score: float,
    backend: str,
) -> ImageDetections:
    """Flat (label, box, score, mask) predictions → ``{class name: [Instance, ...]}`` (score > ``min_score``)."""
    if not (len(labels) == len(boxes) == len(scores)) or (masks is not None and len(masks) != len(labels)):
        raise RewardError(
            f"{backend} detector returned {len(labels)} labels, {len(boxes)} boxes, {len(scores)} scores"
            f"{'' if masks is None else f', {len(masks)} masks'}; expected equal lengths"
        )
    detections: ImageDetections = {}
    for j, (label, box, score) in enumerate(zip(labels, boxes, scores, strict=True)):
        label, score = int(label), float(score)
        if not 0 <= label < len(class_names):
            raise RewardError(f"{backend} detector returned label {label}; expected 0..{len(class_names) - 1}")
        if not np.isfinite(score):
            raise RewardError(f"{backend} detector returned a non-finite score for {class_names[label]!r}")
        if score <= min_score:
            continue
        x1, y1, x2, y2 = (float(v) for v in box[:4])
        mask = None if masks is None else np.asarray(masks[j]).astype(bool)
        detections.setdefault(class_names[label], []).append(Instance((x1, y1, x2, y2), score, mask))
    return detections
