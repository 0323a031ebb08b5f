"""GenEval's own detector through mmdetection 2.x (the ``mmdet`` backend, extra ``mmdet``).

This is the official setup (djghosh13/geneval ``evaluation/evaluate_images.py``): the config
``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py`` and OpenMMLab's checkpoint
``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth`` (``..._20220504_001756-743b7d99.pth`` from
``download.openmmlab.com/mmdetection/v2.0/mask2former/``), run with ``inference_detector``.

mmdet and mmcv are imported only when the model is first loaded. Without a compiled ``mmcv._ext``
(mmcv 1.7.2 built without ops, as a plain source install does), an empty stand-in module is
registered and mmcv's deformable attention is forced onto its pure-PyTorch path: Mask2Former
inference calls no compiled op then (``shared/reference/rewards.md`` §1.9).

mmdet reads an ndarray as BGR (its test pipeline swaps it to RGB). So this backend hands it the
image reversed to BGR, as official GenEval's PNG loading does; ``rgb_as_bgr=True`` hands it the RGB
array as is, reproducing the FlowGRPO / DiffusionNFT reward code
(``inference_detector(model, [np.array(pil_image)])``), whose detector sees R and B swapped.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.types import RewardError
from rewards.geneval_detect.base import ImageDetections, check_image, group_by_class, package_version

MMDET_CONFIG = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py"
MMDET_CHECKPOINT = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth"
EXTRA_HINT = (
    "the 'mmdet' extra: `make mmdet` (it runs `pip install --no-build-isolation mmcv==1.7.2 mmdet==2.28.2` against "
    "the lock's setuptools, which still has the pkg_resources that mmcv 1.x's setup.py needs; docs/install.md)"
)


def mmdet2_result_to_detections(result: Any, class_names: Sequence[str], min_score: float = 0.0) -> ImageDetections:
    """One image's mmdet 2.x result → ``{class name: [Instance, ...]}`` (score > ``min_score``).

    ``result`` is what ``inference_detector`` returns per image: ``(bbox_results, segm_results)``
    (or ``bbox_results`` alone), with one entry per class; ``bbox_results[c]`` is an (N_c, 5) array
    ``[x1, y1, x2, y2, score]`` and ``segm_results[c]`` the N_c binary masks (H, W). Class ``c`` is
    line ``c`` of GenEval's ``object_names.txt``. An mmdet 3.x ``DetDataSample`` is handled too.
    """
    if hasattr(result, "pred_instances"):
        return mmdet3_result_to_detections(result.pred_instances, class_names, min_score)
    bbox_results, segm_results = (
        (result[0], result[1] if len(result) > 1 else None) if isinstance(result, tuple) else (result, None)
    )
    if isinstance(segm_results, tuple):  # (masks, mask scores) from mask-scoring heads
        segm_results = segm_results[0]
    if len(bbox_results) != len(class_names):
        raise RewardError(f"mmdet returned {len(bbox_results)} per-class results, expected {len(class_names)} classes")
    if segm_results is not None and len(segm_results) != len(class_names):
        raise RewardError(f"mmdet returned {len(segm_results)} per-class masks, expected {len(class_names)} classes")
    labels: list[int] = []
    boxes: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for c, per_class in enumerate(bbox_results):
        array = np.asarray(per_class, dtype=np.float64).reshape(-1, 5) if len(per_class) else np.zeros((0, 5))
        if segm_results is not None and len(segm_results[c]) != len(array):
            raise RewardError(
                f"mmdet returned {len(array)} boxes but {len(segm_results[c])} masks for class {class_names[c]!r}"
            )
        labels += [c] * len(array)
        boxes += list(array)
        if segm_results is not None:
            masks += [np.asarray(m) for m in segm_results[c]]
    return group_by_class(
        labels,
        np.stack(boxes)[:, :4] if boxes else np.zeros((0, 4)),
        [float(b[4]) for b in boxes],
        masks if segm_results is not None else None,
        class_names,
        min_score,
        "mmdet",
    )


def mmdet3_result_to_detections(
    pred_instances: Any, class_names: Sequence[str], min_score: float = 0.0
) -> ImageDetections:
    """mmdet 3.x ``DetDataSample.pred_instances`` (bboxes, scores, labels[, masks]) → per-class instances.

    mmdet 3.x no longer returns the 2.x per-class arrays that GenEval indexes (FlowGRPO
    reward-server issue #5: "'DetDataSample' object is not subscriptable"); this rebuilds them.
    """

    def array(value: Any) -> np.ndarray:
        return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)

    masks = getattr(pred_instances, "masks", None)
    return group_by_class(
        array(pred_instances.labels).tolist(),
        array(pred_instances.bboxes),
        array(pred_instances.scores).tolist(),
        None if masks is None else list(array(masks)),
        class_names,
        min_score,
        "mmdet",
    )


def install_ext_stub() -> bool:
    """Register an empty ``mmcv._ext`` when mmcv was built without ops; returns whether it did.

    Any op looked up on it raises ``NotImplementedError`` naming the op, so a code path that
    really needs a compiled op fails loudly instead of silently.
    """
    if "mmcv._ext" in sys.modules or importlib.util.find_spec("mmcv._ext") is not None:
        return False
    stub = types.ModuleType("mmcv._ext")

    def missing(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def op(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError(
                f"mmcv._ext.{name} is not compiled: this path needs mmcv 1.7 built with its ops (MMCV_WITH_OPS=1)"
            )

        return op

    stub.__getattr__ = missing  # type: ignore[method-assign]
    stub.__file__ = "<diffrl stub: mmcv built without ops>"
    stub.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)
    sys.modules["mmcv._ext"] = stub
    return True


def import_mmdet() -> tuple[Any, Any, Any]:
    """``(mmcv.Config, init_detector, inference_detector)``, raising a :class:`RewardError` naming the extra."""
    if importlib.util.find_spec("mmdet") is None or importlib.util.find_spec("mmcv") is None:
        raise RewardError(f"the 'mmdet' GenEval backend needs mmdet 2.x and mmcv 1.x; install them with {EXTRA_HINT}")
    stubbed = install_ext_stub()
    mmcv = importlib.import_module("mmcv")
    apis = importlib.import_module("mmdet.apis")
    if stubbed:  # no compiled deformable attention: use mmcv's pure-PyTorch implementation on every device
        msda = importlib.import_module("mmcv.ops.multi_scale_deform_attn")
        if hasattr(msda, "IS_CUDA_AVAILABLE"):
            setattr(msda, "IS_CUDA_AVAILABLE", False)  # noqa: B010 (a module flag, not a typed attribute)
    if not hasattr(mmcv, "Config"):
        raise RewardError(f"found mmcv {mmcv.__version__}; GenEval's mmdet 2.x backend needs mmcv 1.x ({EXTRA_HINT})")
    return mmcv.Config, apis.init_detector, apis.inference_detector


def default_config() -> Path:
    """GenEval's config file as shipped inside the installed mmdet package."""
    spec = importlib.util.find_spec("mmdet")
    if spec is None or spec.origin is None:
        raise RewardError(f"mmdet is not installed; install it with {EXTRA_HINT}")
    root = Path(spec.origin).parent
    candidates = [
        root / ".mim" / "configs" / "mask2former" / MMDET_CONFIG,
        root.parent / "configs" / "mask2former" / MMDET_CONFIG,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise RewardError(f"GenEval's config {MMDET_CONFIG} not found; looked in {[str(p) for p in candidates]}")


class MMDetMask2FormerDetector:
    """The official GenEval detector: mmdet 2.x Mask2Former Swin-S (see the module docstring).

    ``checkpoint`` is the ``.pth`` file, or a folder holding ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth``
    (GenEval's ``--model-path``); ``config`` defaults to the one shipped with mmdet.
    """

    name = "mmdet"

    def __init__(
        self,
        class_names: Sequence[str],
        checkpoint: str | Path | None,
        config: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 4,
        rgb_as_bgr: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.version = f"mmdet-{package_version('mmdet', EXTRA_HINT)}"
        if checkpoint is None:
            raise RewardError(
                f"the 'mmdet' GenEval backend needs detector_path= the checkpoint {MMDET_CHECKPOINT} (or its folder), "
                "downloaded by GenEval's evaluation/download_models.sh"
            )
        path = Path(checkpoint)
        self.checkpoint = path / MMDET_CHECKPOINT if path.is_dir() else path
        self.version += f":{self.checkpoint.name}"
        self.class_names, self.config = tuple(class_names), config
        self.device, self.batch_size, self.rgb_as_bgr = device, batch_size, rgb_as_bgr
        self._model: Any = None
        self._inference: Any = None

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            config_cls, init_detector, inference_detector = import_mmdet()
            if not self.checkpoint.is_file():
                raise RewardError(f"mmdet checkpoint {self.checkpoint} does not exist")
            config = config_cls.fromfile(str(self.config or default_config()))
            config.model.backbone.init_cfg = None  # the checkpoint has all weights; do not fetch ImageNet Swin
            self._model = init_detector(config, str(self.checkpoint), device=self.device)
            self._inference = inference_detector
            classes = tuple(getattr(self._model, "CLASSES", None) or ())
            if len(classes) not in (0, len(self.class_names)):
                raise RewardError(f"mmdet model has {len(classes)} classes, GenEval needs {len(self.class_names)}")
        return self._model, self._inference

    def detect(self, images: Sequence[np.ndarray], min_score: float = 0.0) -> list[ImageDetections]:
        """Per image, ``{class name: [Instance, ...]}`` from ``inference_detector`` (score > ``min_score``)."""
        for i, image in enumerate(images):
            check_image(image, f"image {i}")
        model, inference_detector = self._load()
        results: list[ImageDetections] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [
                image if self.rgb_as_bgr else np.ascontiguousarray(image[:, :, ::-1])
                for image in images[start : start + self.batch_size]
            ]
            raw = inference_detector(model, chunk)
            if len(raw) != len(chunk):
                raise RewardError(f"mmdet returned {len(raw)} results for {len(chunk)} images")
            results += [mmdet2_result_to_detections(r, self.class_names, min_score) for r in raw]
        return results
