"""The GenEval rule engine (Ghosh et al., NeurIPS 2023 D&B; djghosh13/geneval).

The engine judges one image from its per-class detections and the prompt's metadata.
It is detector-agnostic: the shapes world feeds it detections from a rule-based
detector, and the real GenEval reward feeds it Mask2Former's. It sits in the core because
rewards (which judge with it) and benchmarks (whose prompts and metrics follow its tasks and
metadata) both need it and must not import each other.

Three judgements are made per image, as in the official code and FlowGRPO's reward server:

* ``correct`` — the official GenEval rule (``evaluation/evaluate_images.py:evaluate``):
  each ``include`` clause needs at least ``count`` kept detections of its class; colour and
  position are checked on the top-``count`` detections only; ``exclude`` clauses fail when
  at least ``count`` detections of the class are kept. This is the evaluation metric.
* ``strict`` — FlowGRPO's ``strict_correct``: exactly ``count`` detections per include,
  exactly ``count`` of the requested colour, positions hold; excludes are ignored.
* ``score`` — FlowGRPO's partial-credit training reward (``reward_server/gen_eval.py:
  evaluate_reward``), the mean of per-clause terms. ``score_variant="flowgrpo"`` keeps its
  quirks (a failed position clause still adds 1.0; excludes are ignored); ``"corrected"``
  drops the stray 1.0 and scores each exclude clause 1/0.

Detections are filtered as the official code does before judging: score strictly above
``threshold`` (``counting_threshold`` for the counting task), sorted by score, at most
``max_objects`` per class, then greedy IoU suppression at ``max_overlap`` (1.0 disables it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from harness.data_files import fetch
from harness.validation import check_at_least, check_non_negative, check_unit_interval

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")

Box = tuple[float, float, float, float]
ScoreVariant = Literal["flowgrpo", "corrected"]


class MetadataError(ValueError):
    """Raised when GenEval metadata is malformed; the message names the field and the fix."""


@dataclass(frozen=True)
class Detection:
    """One detected object: ``box`` = (x1, y1, x2, y2) in pixels, ``color`` = the classifier's label."""

    box: Box
    score: float
    color: str | None = None


@dataclass(frozen=True)
class GenEvalRules:
    """Thresholds of the official evaluator (``evaluate_images.py`` defaults)."""

    threshold: float = 0.3  # keep detections with score > threshold (confidences lie in [0, 1])
    counting_threshold: float = 0.9  # the same for the counting task
    max_objects: int = 16  # per class, after sorting by score
    max_overlap: float = 1.0  # IoU suppression at this overlap; 1.0 disables it
    position_threshold: float = 0.1  # relative_position's shrink factor of the summed box extents

    def __post_init__(self) -> None:
        check_unit_interval(self, "threshold", "counting_threshold", "max_overlap", closed_right=True)
        check_at_least(self, 1, "max_objects")
        check_non_negative(self, "position_threshold")


@dataclass(frozen=True)
class GenEvalResult:
    """The judgement of one image."""

    tag: str
    correct: bool
    strict: bool
    score: float
    reason: str
    kept: dict[str, list[Detection]] = field(default_factory=dict)


def load_class_names(path: str | Path | None = None, data_dir: str | Path | None = None) -> list[str]:
    """GenEval's 80 class names (``object_names.txt``) from ``path``, or the verified public file."""
    file = Path(path) if path is not None else fetch("geneval/object_names.txt", data_dir)[0]
    names = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise MetadataError(f"{file} lists a class name twice; expected one distinct name per line")
    return names


def validate_metadata(metadata: Mapping[str, Any], known_classes: Sequence[str] | None = None) -> None:
    """Check the shape of GenEval metadata; raise :class:`MetadataError` naming the bad field."""
    if not isinstance(metadata, Mapping):
        raise MetadataError(f"metadata must be a mapping with keys tag/include/exclude, got {type(metadata).__name__}")
    tag = metadata.get("tag")
    if tag not in TASKS:
        raise MetadataError(f"metadata['tag'] = {tag!r}; allowed: {', '.join(TASKS)}")
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        raise MetadataError("metadata['include'] must be a non-empty list of {class, count[, color][, position]}")
    for kind in ("include", "exclude"):
        for i, clause in enumerate(metadata.get(kind, [])):
            where = f"metadata['{kind}'][{i}]"
            if not isinstance(clause, Mapping):
                raise MetadataError(f"{where} must be a mapping, got {clause!r}")
            allowed = {"class", "count", "color", "position"} if kind == "include" else {"class", "count"}
            unknown = set(clause) - allowed
            if unknown:
                raise MetadataError(f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
            cls = clause.get("class")
            if not isinstance(cls, str) or (known_classes is not None and cls not in known_classes):
                allowed_cls = f"; allowed: {', '.join(known_classes)}" if known_classes is not None else ""
                raise MetadataError(f"{where}['class'] = {cls!r} is not a known class{allowed_cls}")
            count = clause.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise MetadataError(f"{where}['count'] = {count!r}; expected an integer >= 1")
            if "position" in clause:
                position = clause["position"]
                ok = (
                    isinstance(position, (list, tuple))
                    and len(position) == 2
                    and position[0] in RELATIONS
                    and isinstance(position[1], int)
                    and 0 <= position[1] < i
                )
                if not ok:
                    raise MetadataError(
                        f"{where}['position'] = {position!r}; expected [relation, index of an earlier include] "
                        f"with relation in {list(RELATIONS)}"
                    )


def iou(box_a: Box, box_b: Box) -> float:
    """IoU with the +1-pixel area convention of the official code."""

    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area((max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])))
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def relative_position(box_a: Box, box_b: Box, threshold: float = 0.1) -> set[str]:
    """Relations of A to B (GenEval ``relative_position``).

    The centre offset on each axis is shrunk by ``threshold`` × the summed box extents on that
    axis; an axis counts when its shrunk offset is more than half the offset's norm. Image y
    grows downwards, so "above" means a smaller y.
    """
    centre_a = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    centre_b = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    extent_a = (abs(box_a[2] - box_a[0]), abs(box_a[3] - box_a[1]))
    extent_b = (abs(box_b[2] - box_b[0]), abs(box_b[3] - box_b[1]))
    offset = (centre_a[0] - centre_b[0], centre_a[1] - centre_b[1])
    shrunk = [
        max(abs(offset[k]) - threshold * (extent_a[k] + extent_b[k]), 0.0) * math.copysign(1.0, offset[k])
        if offset[k] != 0
        else 0.0
        for k in range(2)
    ]
    if all(abs(s) < 1e-3 for s in shrunk):
        return set()
    norm = math.hypot(*offset)
    dx, dy = shrunk[0] / norm, shrunk[1] / norm
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def filter_detections(
    detections: Mapping[str, Sequence[Detection]], tag: str, rules: GenEvalRules = GenEvalRules()
) -> dict[str, list[Detection]]:
    """Keep detections as the official evaluator does; classes with none kept are absent."""
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    kept: dict[str, list[Detection]] = {}
    for cls, dets in detections.items():
        ordered = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)[: rules.max_objects]
        chosen: list[Detection] = []
        while ordered:
            best = ordered.pop(0)
            chosen.append(best)
            if rules.max_overlap < 1:
                ordered = [d for d in ordered if iou(best.box, d.box) < rules.max_overlap]
        if chosen:
            kept[cls] = chosen
    return kept


def _color_count(objects: Sequence[Detection], color: str) -> int:
    return sum(1 for d in objects if d.color == color)


def _position_violation(
    objects: Sequence[Detection], targets: Sequence[Detection], relation: str, threshold: float
) -> str | None:
    for obj in objects:
        for target in targets:
            found = relative_position(obj.box, target.box, threshold)
            if relation not in found:
                return " and ".join(sorted(found)) or "no clear relation"
    return None


def judge_official(
    metadata: Mapping[str, Any], kept: Mapping[str, Sequence[Detection]], rules: GenEvalRules
) -> tuple[bool, str]:
    """The official GenEval ``evaluate``: includes are "at least", colour/position on the top-``count``."""
    reasons: list[str] = []
    groups: list[Sequence[Detection] | None] = []
    for clause in metadata["include"]:
        cls, count = clause["class"], clause["count"]
        found = list(kept.get(cls, []))[:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in clause and _color_count(found, clause["color"]) < count:
                matched = False
                colors = ", ".join(f"{c}" for c in sorted({d.color or "none" for d in found}))
                reasons.append(
                    f"expected {clause['color']} {cls}>={count}, found {_color_count(found, clause['color'])} ({colors})"
                )
            if "position" in clause and matched:
                relation, target = clause["position"]
                if groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {relation}")
                else:
                    violation = _position_violation(found, groups[target], relation, rules.position_threshold)
                    if violation is not None:
                        matched = False
                        reasons.append(f"expected {cls} {relation} target, found {violation} target")
        groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        n = len(kept.get(clause["class"], []))
        if n >= clause["count"]:
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {n}")
    return not reasons, "\n".join(reasons)


def judge_partial(
    metadata: Mapping[str, Any], kept: Mapping[str, Sequence[Detection]], rules: GenEvalRules, variant: ScoreVariant
) -> tuple[bool, float]:
    """FlowGRPO's ``evaluate_reward``: returns (strict_correct, partial-credit score).

    Per include: ``1 − |count − n|/count`` over all kept detections (can be negative); a wrong
    count adds 0 for a colour/position clause; a colour adds ``1 − |count − n_color|/count``;
    a position adds 0 on the first violation and, in the ``flowgrpo`` variant, 1.0 after the loop
    regardless (their quirk); a missing target adds 0.
    """
    terms: list[float] = []
    strict = True
    groups: list[Sequence[Detection] | None] = []
    for clause in metadata["include"]:
        cls, count = clause["class"], clause["count"]
        found = list(kept.get(cls, []))
        terms.append(1 - abs(count - len(found)) / count)
        matched = True
        if len(found) != count:
            matched = False
            if "color" in clause or "position" in clause:
                terms.append(0.0)
        else:
            if "color" in clause:
                n_color = _color_count(found, clause["color"])
                terms.append(1 - abs(count - n_color) / count)
                matched = n_color == count
            if "position" in clause and matched:
                relation, target = clause["position"]
                if groups[target] is None:
                    matched = False
                    terms.append(0.0)
                else:
                    violated = _position_violation(found, groups[target], relation, rules.position_threshold)
                    if violated is not None:
                        matched = False
                        terms.append(0.0)
                    if variant == "flowgrpo" or violated is None:
                        terms.append(1.0)  # deviation kept on purpose in "flowgrpo": added even after a violation
        strict = strict and matched
        groups.append(found if matched else None)
    if variant == "corrected":
        for clause in metadata.get("exclude", []):
            terms.append(0.0 if len(kept.get(clause["class"], [])) >= clause["count"] else 1.0)
    return strict, (sum(terms) / len(terms) if terms else 0.0)


def evaluate_detections(
    metadata: Mapping[str, Any],
    detections: Mapping[str, Sequence[Detection]],
    *,
    rules: GenEvalRules = GenEvalRules(),
    score_variant: ScoreVariant = "flowgrpo",
) -> GenEvalResult:
    """Judge one image from its raw per-class detections (filtered here as the official code does)."""
    validate_metadata(metadata)
    kept = filter_detections(detections, metadata["tag"], rules)
    correct, reason = judge_official(metadata, kept, rules)
    strict, score = judge_partial(metadata, kept, rules, score_variant)
    return GenEvalResult(tag=metadata["tag"], correct=correct, strict=strict, score=score, reason=reason, kept=kept)


def surplus_detections(
    metadata: Mapping[str, Any], detections: Mapping[str, Sequence[Detection]], rules: GenEvalRules = GenEvalRules()
) -> int:
    """Detections of any class scoring above ``rules.threshold`` beyond the objects the prompt asks for (≥ 0).

    A clutter diagnostic reported beside the GenEval scores (``extra_objects``), not part of the official
    judgement: the "at least ``count``" rule passes an image with surplus objects, so clutter inflates
    ``overall`` while this count shows it.
    """
    asked = sum(int(clause["count"]) for clause in metadata["include"])
    found = sum(1 for dets in detections.values() for d in dets if d.score > rules.threshold)
    return max(0, found - asked)


def task_summary(
    results: Sequence[GenEvalResult], field_name: Literal["correct", "strict", "score"] = "correct"
) -> dict[str, float]:
    """Per-task mean of one judgement plus ``overall`` = the unweighted mean over tasks present (GenEval)."""
    per_task: dict[str, list[float]] = {}
    for result in results:
        per_task.setdefault(result.tag, []).append(float(getattr(result, field_name)))
    summary = {tag: sum(v) / len(v) for tag, v in per_task.items()}
    ordered = {tag: summary[tag] for tag in TASKS if tag in summary}
    ordered["overall"] = sum(ordered.values()) / len(ordered) if ordered else float("nan")
    return ordered
