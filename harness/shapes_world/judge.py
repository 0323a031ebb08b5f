"""The shapes world's GenEval judge: the rule-based detector feeding the GenEval rule engine.

The shapes benchmark's metric and the ``shapes_geneval`` reward (:mod:`rewards.shapes`) both judge with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from harness.geneval_rules import (
    GenEvalResult,
    GenEvalRules,
    ScoreVariant,
    evaluate_detections,
    surplus_detections,
)
from harness.images import to_uint8
from harness.shapes_world.detect import detect
from harness.shapes_world.world import validate_shapes_metadata
from harness.types import Prompt


def judge_images(
    images: Tensor,
    prompts: Sequence[Prompt],
    *,
    rules: GenEvalRules = GenEvalRules(),
    score_variant: ScoreVariant = "flowgrpo",
) -> list[GenEvalResult]:
    """Detect and judge every image against its prompt's GenEval metadata."""
    return judge_and_count(images, prompts, rules=rules, score_variant=score_variant)[0]


def judge_and_count(
    images: Tensor,
    prompts: Sequence[Prompt],
    *,
    rules: GenEvalRules = GenEvalRules(),
    score_variant: ScoreVariant = "flowgrpo",
) -> tuple[list[GenEvalResult], list[int]]:
    """:func:`judge_images` plus each image's surplus detections (:func:`~harness.geneval_rules.surplus_detections`)."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    results, surplus = [], []
    for image, prompt in zip(to_uint8(images), prompts, strict=True):
        validate_shapes_metadata(prompt.metadata)
        detections = detect(image)
        results.append(evaluate_detections(prompt.metadata, detections, rules=rules, score_variant=score_variant))
        surplus.append(surplus_detections(prompt.metadata, detections, rules))
    return results, surplus
