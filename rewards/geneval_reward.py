"""The GenEval reward: Mask2Former detections + CLIP colours, judged by the GenEval rule engine.

GenEval (Ghosh et al., NeurIPS 2023 D&B; djghosh13/geneval ``evaluation/evaluate_images.py``) detects
the 80 COCO classes with Mask2Former, keeps detections above 0.3 (0.9 for counting, at most 16 per
class), names the colour of detected objects with zero-shot CLIP ViT-L/14, and checks the prompt's
clauses. The thresholds, filtering and all three judgements live in :mod:`harness.geneval_rules`; this
module feeds them real detections:

* ``judgement="correct"``: the official GenEval rule, the evaluation metric;
* ``judgement="score"`` (default): FlowGRPO's partial-credit training reward, the one FlowGRPO and
  DiffusionNFT train on (``reward-server/gen_eval.py:evaluate_reward``); ``score_variant="flowgrpo"``
  keeps its quirks, ``"corrected"`` fixes them (see :func:`harness.geneval_rules.judge_partial`). It can be
  negative: one clause term is ``1 − |count − n| / count``, down to ``1 − 15`` with 16 kept objects;
* ``judgement="strict"``: FlowGRPO's ``strict_correct``.

Colours are classified for every kept detection of a class that a clause asks a colour of (FlowGRPO's
partial score counts colours over all of them; the official rule reads the top ``count``).

Detector backends (:mod:`rewards.geneval_detect`): ``mmdet`` is the official checkpoint through mmdet
2.x (extra ``mmdet``); ``hf`` is transformers' Mask2Former, an approximation. Each
:class:`JudgedImage` records the backend that made its detections.

Channel order: by default every backend sees the image in the channel order it expects. FlowGRPO's
and DiffusionNFT's reward code hands mmdet RGB arrays, which mmdet reads as BGR, so during their
training the detector sees R and B swapped (colour classification, on the PIL image, is unaffected).
``rgb_as_bgr=True`` reproduces that quirk, to match their training reward exactly.

Deviations, on purpose: FlowGRPO's server JPEG-encodes images (quality 75) before scoring; here the
decoded pixels are scored as they are. The official CLIP runs under fp16 autocast on CUDA; on the CPU
it runs in fp32 here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from harness.geneval_rules import (
    Detection,
    GenEvalResult,
    GenEvalRules,
    MetadataError,
    ScoreVariant,
    evaluate_detections,
    filter_detections,
    load_class_names,
    validate_metadata,
)
from harness.images import to_uint8
from harness.types import Prompt, RewardError, RewardSpec, check_images
from rewards.geneval_detect import BackendName, Detector, ImageDetections, make_detector
from rewards.geneval_detect.color import ClipBackend, ColorClassifier, make_color_classifier

Judgement = Literal["score", "correct", "strict"]


@dataclass(frozen=True)
class JudgedImage:
    """One judged image: the rule engine's result plus which detector and colour model produced it."""

    result: GenEvalResult
    backend: str
    color_model: str

    def details(self) -> dict[str, list[list[float]]]:
        """Kept detections as GenEval writes them: ``{class: [[x1, y1, x2, y2, score], ...]}``."""
        return {cls: [[*d.box, d.score] for d in dets] for cls, dets in self.result.kept.items()}

    def colors(self) -> dict[str, list[str | None]]:
        """The colour named for each kept detection (``None`` where no clause asked for one)."""
        return {cls: [d.color for d in dets] for cls, dets in self.result.kept.items()}


def resolve_class_names(
    class_names: str | Path | Sequence[str] | None, data_dir: str | Path | None = None
) -> tuple[str, ...]:
    """GenEval's 80 class names: given, read from a file, or the verified public ``object_names.txt``.

    The public file is read from ``data_dir/geneval/object_names.txt`` when ``data_dir`` is given, else from
    the cache (``$DIFFRL_CACHE/prompt_sets/geneval/object_names.txt``, downloaded there on first use).
    """
    if isinstance(class_names, (str, Path)) and not Path(class_names).is_file():
        raise MetadataError(f"class names file {class_names} does not exist (GenEval's object_names.txt, 80 lines)")
    if class_names is None or isinstance(class_names, (str, Path)):
        names = tuple(load_class_names(class_names, data_dir))
    else:
        names = tuple(class_names)
    if len(names) != 80 or len(set(names)) != 80:
        raise MetadataError(f"GenEval needs the 80 distinct class names of object_names.txt, got {len(names)}")
    return names


def judge_detections(
    image: np.ndarray,
    metadata: Mapping[str, Any],
    detections: ImageDetections,
    colors: ColorClassifier,
    rules: GenEvalRules = GenEvalRules(),
    score_variant: ScoreVariant = "flowgrpo",
) -> GenEvalResult:
    """Judge one image from its detector output: filter, name colours where asked, apply the rules.

    Detections are filtered as the official code does (:func:`harness.geneval_rules.filter_detections`);
    every kept detection of a class with a colour clause gets its colour from ``colors``.
    """
    color_classes = {clause["class"] for clause in metadata["include"] if "color" in clause}
    plain = {cls: [Detection(inst.box, inst.score) for inst in insts] for cls, insts in detections.items()}
    kept = filter_detections(plain, metadata["tag"], rules)
    judged: dict[str, list[Detection]] = {}
    for cls, dets in kept.items():
        if cls not in color_classes:
            judged[cls] = dets
            continue
        instance_of = {id(d): inst for d, inst in zip(plain[cls], detections[cls], strict=True)}
        named = colors.classify(image, [instance_of[id(d)] for d in dets], cls)
        if len(named) != len(dets):
            raise RewardError(f"colour classifier named {len(named)} colours for {len(dets)} {cls!r} detections")
        judged[cls] = [replace(d, color=c) for d, c in zip(dets, named, strict=True)]
    return evaluate_detections(metadata, judged, rules=rules, score_variant=score_variant)


class GenEvalReward:
    """GenEval over a batch: images (B, 3, H, W) in [0, 1] with GenEval metadata → (B,) judgements.

    ``backend``: ``"mmdet"`` (official; ``detector_path`` = the checkpoint or its folder) or ``"hf"``
    (``detector_path`` = hub id or folder), or any :class:`~rewards.geneval_detect.Detector`.
    ``clip_backend`` / ``clip_path``: the colour model when ``color_classifier`` is not given: ``hf``
    (default; hub id or folder, default ``openai/clip-vit-large-patch14``) or ``open_clip`` (the official
    loader; a ``local-dir`` folder or a ViT-L-14 checkpoint file, default OpenAI's weights by tag).
    ``class_names``: GenEval's ``object_names.txt`` (a path or the names; default: the public file).
    Models load on the first call. ``last_results`` keeps the latest call's :class:`JudgedImage` list.
    """

    def __init__(
        self,
        judgement: Judgement = "score",
        score_variant: ScoreVariant = "flowgrpo",
        backend: BackendName | Detector = "mmdet",
        detector_path: str | Path | None = None,
        detector_config: str | Path | None = None,
        clip_path: str | Path | None = None,
        clip_backend: ClipBackend = "hf",
        device: str = "cpu",
        batch_size: int = 8,
        rgb_as_bgr: bool = False,
        class_names: str | Path | Sequence[str] | None = None,
        rules: GenEvalRules = GenEvalRules(),
        color_classifier: ColorClassifier | None = None,
    ) -> None:
        if judgement not in ("score", "correct", "strict"):
            raise ValueError(f"judgement must be 'score', 'correct' or 'strict', got {judgement!r}")
        if score_variant not in ("flowgrpo", "corrected"):
            raise ValueError(f"score_variant must be 'flowgrpo' or 'corrected', got {score_variant!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.judgement, self.score_variant, self.rules, self.batch_size = judgement, score_variant, rules, batch_size
        self.class_names = resolve_class_names(class_names)
        if isinstance(backend, str):
            self.detector = make_detector(
                backend, self.class_names, detector_path, detector_config, device, batch_size, rgb_as_bgr
            )
        else:
            if detector_path is not None or detector_config is not None or rgb_as_bgr:
                raise ValueError("detector_path, detector_config and rgb_as_bgr configure a named backend only")
            self.detector = backend
        if color_classifier is None:
            color_classifier = make_color_classifier(clip_backend, clip_path, device)
        self.colors = color_classifier
        low = 1.0 - (rules.max_objects - 1) if judgement == "score" else 0.0
        self.spec = RewardSpec(
            name="geneval",
            version=f"1/{judgement}/{score_variant}/{self.detector.name}{'/rgb_as_bgr' if rgb_as_bgr else ''}",
            description="GenEval: Mask2Former detections + CLIP colours judged by the official rules",
            value_range=(low, 1.0),
        )
        self.last_results: list[JudgedImage] = []

    @property
    def backend(self) -> str:
        """The detector that makes this reward's detections, with its version."""
        return f"{self.detector.name}:{self.detector.version}"

    def judge(self, images: Sequence[np.ndarray], metadatas: Sequence[Mapping[str, Any]]) -> list[JudgedImage]:
        """Judge RGB uint8 images (H, W, 3) against their GenEval metadata, ``batch_size`` at a time."""
        if len(images) != len(metadatas):
            raise ValueError(f"{len(images)} images but {len(metadatas)} metadata entries")
        for i, metadata in enumerate(metadatas):
            try:
                validate_metadata(metadata, self.class_names)
            except MetadataError as error:
                prompt = metadata.get("prompt") if isinstance(metadata, Mapping) else None
                raise MetadataError(f"image {i} (prompt {prompt!r}): {error}") from None
        min_score = min(self.rules.threshold, self.rules.counting_threshold)
        judged: list[JudgedImage] = []
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start : start + self.batch_size])
            found = self.detector.detect(chunk, min_score)
            if len(found) != len(chunk):
                raise RewardError(f"detector {self.backend} returned {len(found)} results for {len(chunk)} images")
            for image, metadata, detections in zip(chunk, metadatas[start : start + len(chunk)], found, strict=True):
                unknown = sorted(set(detections) - set(self.class_names))
                if unknown:
                    raise RewardError(f"detector {self.backend} returned unknown classes {unknown}")
                result = judge_detections(image, metadata, detections, self.colors, self.rules, self.score_variant)
                judged.append(JudgedImage(result, self.backend, self.colors.name))
        return judged

    def __call__(self, images: Tensor, prompts: Sequence[Prompt]) -> Tensor:
        check_images(self.spec.name, images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        self.last_results = self.judge(list(to_uint8(images)), [p.metadata for p in prompts])
        return torch.tensor([float(getattr(j.result, self.judgement)) for j in self.last_results], dtype=torch.float32)
