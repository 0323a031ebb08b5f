"""GenEval's detection stack: the detector interface and its backends, the CLIP colour classifier, the folder scorer.

* :mod:`.base` — :class:`Instance`, the :class:`Detector` protocol, boxes from masks.
* :mod:`.mmdet_backend` — the official mmdet 2.x Mask2Former (extra ``mmdet``), imported lazily.
* :mod:`.hf_backend` — transformers' Mask2Former, an approximation.
* :mod:`.color` — zero-shot CLIP ViT-L/14 colour classification.
* :mod:`.folder` — score a folder laid out as GenEval's generator writes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rewards.geneval_detect.base import BackendName, Detector, ImageDetections, Instance, masks_to_boxes

__all__ = ["BackendName", "Detector", "ImageDetections", "Instance", "make_detector", "masks_to_boxes"]


def make_detector(
    backend: BackendName,
    class_names: Sequence[str],
    detector_path: str | Path | None = None,
    detector_config: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 4,
    rgb_as_bgr: bool = False,
) -> Detector:
    """Build a backend by name; its model loads on the first ``detect``.

    ``detector_path``: for ``mmdet`` the checkpoint (or its folder; required), for ``hf`` a hub id
    or local folder (default ``facebook/mask2former-swin-small-coco-instance``).
    ``detector_config``: the mmdet config (default: GenEval's, shipped with mmdet); not used by ``hf``.
    """
    if backend == "mmdet":
        from rewards.geneval_detect.mmdet_backend import MMDetMask2FormerDetector

        return MMDetMask2FormerDetector(
            class_names, detector_path, detector_config, device=device, batch_size=batch_size, rgb_as_bgr=rgb_as_bgr
        )
    if backend == "hf":
        from rewards.geneval_detect.hf_backend import DEFAULT_HF_DETECTOR, HFMask2FormerDetector

        if detector_config is not None:
            raise ValueError("detector_config applies to the 'mmdet' backend only; the 'hf' backend reads its folder")
        return HFMask2FormerDetector(
            class_names,
            detector_path or DEFAULT_HF_DETECTOR,
            device=device,
            batch_size=batch_size,
            rgb_as_bgr=rgb_as_bgr,
        )
    raise ValueError(f"unknown GenEval detector backend {backend!r}; allowed: 'mmdet', 'hf'")
