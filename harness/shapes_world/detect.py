"""Rule-based detector for the shapes world: image → GenEval-style per-class detections.

1. Each pixel takes the nearest palette colour (or the background) in RGB; pixels farther
   than ``MAX_COLOR_DISTANCE`` from every palette colour stay unassigned.
2. Connected components (8-connectivity) are found per colour; tiny ones are noise.
3. A component's shape is the template (circle, square, triangle, diamond at the component's
   size) with the highest IoU against it; that IoU is the detection score. Clean renders score
   1.0; blurry or malformed shapes score lower and so fail GenEval's 0.9 counting threshold
   first, as weak detections do with the real Mask2Former.
   A component smaller than the world's smallest object (``MIN_SIDE`` px) is a fragment: its score
   is scaled by ``(side − 3) / (MIN_SIDE − 3)`` (clipped to [0, 1]), so a 4-px blob scores at most
   0.25 and is not kept at GenEval's 0.3 threshold. Without it a 4×4 block (a sampler's stray
   patch) is a "perfect square" at 1.0, and clutter of such fragments passed the "at least" rules
   and even counting's 0.9 threshold — objects Mask2Former would not find with confidence.
4. The colour label is the component's palette colour (the "colour classifier").
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from harness.geneval_rules import Detection
from harness.shapes_world.render import COUNTING_SIZE_RANGE, SIZE_RANGE, shape_mask
from harness.shapes_world.world import BACKGROUND, COLORS, SHAPES

MAX_COLOR_DISTANCE = 90.0
MIN_AREA = 6
MIN_SIDE = min(SIZE_RANGE[0], COUNTING_SIZE_RANGE[0])  # 7: the smallest object the renderer draws
_PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)  # index 0 = background
_COLOR_NAMES = ("background", *COLORS)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def color_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) int map: 0 background/unassigned, k ≥ 1 the k-th palette colour."""
    distances = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - _PALETTE[None, None], axis=-1)
    labels = distances.argmin(-1)
    labels[distances.min(-1) > MAX_COLOR_DISTANCE] = 0
    return labels


def classify_component(mask: np.ndarray) -> tuple[str, float]:
    """Best-matching shape for a cropped component mask and its template IoU."""
    size = max(mask.shape)
    canvas = np.zeros((size, size), dtype=bool)
    oy, ox = (size - mask.shape[0]) // 2, (size - mask.shape[1]) // 2
    canvas[oy : oy + mask.shape[0], ox : ox + mask.shape[1]] = mask
    best_shape, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        template = shape_mask(shape, size)
        iou = float((template & canvas).sum() / (template | canvas).sum())
        if iou > best_iou:
            best_shape, best_iou = shape, iou
    return best_shape, best_iou


def fragment_factor(side: int) -> float:
    """Score multiplier of a component whose bounding box's longer side is ``side`` px (1 from ``MIN_SIDE``)."""
    return min(1.0, max(0.0, (side - 3) / (MIN_SIDE - 3)))


def detect(image: np.ndarray) -> dict[str, list[Detection]]:
    """Detect shapes in one (H, W, 3) uint8 image, sorted by descending score per class."""
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"detect expects an (H, W, 3) uint8 image, got shape {image.shape} dtype {image.dtype}")
    labels = color_labels(image)
    detections: dict[str, list[Detection]] = {}
    for color_index in range(1, len(_PALETTE)):
        components, n = ndimage.label(labels == color_index, structure=_EIGHT_CONNECTED)
        for k, found in enumerate(ndimage.find_objects(components), start=1):
            if found is None:
                continue
            mask = components[found] == k
            if mask.sum() < MIN_AREA:
                continue
            shape, iou = classify_component(mask)
            score = iou * fragment_factor(max(mask.shape))
            rows, cols = found
            box = (float(cols.start), float(rows.start), float(cols.stop), float(rows.stop))
            detections.setdefault(shape, []).append(Detection(box, score, _COLOR_NAMES[color_index]))
    for dets in detections.values():
        dets.sort(key=lambda d: -d.score)
    return detections
