"""The shapes world's GenEval reward: the rule-based detector feeding the GenEval rule engine.

``judgement="score"`` is FlowGRPO's partial-credit training reward; ``"correct"`` is the
official GenEval rule (the eval metric); ``"strict"`` is FlowGRPO's strict variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from benchmarks.base import Prompt
from benchmarks.shapes.detect import detect
from benchmarks.shapes.world import validate_shapes_metadata
from rewards.base import RewardSpec
from rewards.geneval import GenEvalResult, GenEvalRules, ScoreVariant, evaluate_detections

Judgement = Literal["score", "correct", "strict"]


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] → (B, H, W, 3) uint8."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def judge_images(
    images: Tensor,
    prompts: Sequence[Prompt],
    *,
    rules: GenEvalRules = GenEvalRules(),
    score_variant: ScoreVariant = "flowgrpo",
) -> list[GenEvalResult]:
    """Detect and judge every image against its prompt's GenEval metadata."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    results = []
    for image, prompt in zip(to_uint8(images), prompts, strict=True):
        validate_shapes_metadata(prompt.metadata)
        results.append(evaluate_detections(prompt.metadata, detect(image), rules=rules, score_variant=score_variant))
    return results


class ShapesGenEval:
    """GenEval on the shapes world (rule-based detector + the official rules)."""

    def __init__(self, judgement: Judgement = "score", score_variant: ScoreVariant = "flowgrpo") -> None:
        if judgement not in ("score", "correct", "strict"):
            raise ValueError(f"judgement must be 'score', 'correct' or 'strict', got {judgement!r}")
        if score_variant not in ("flowgrpo", "corrected"):
            raise ValueError(f"score_variant must be 'flowgrpo' or 'corrected', got {score_variant!r}")
        self.judgement, self.score_variant = judgement, score_variant
        low = -1.0 if judgement == "score" else 0.0  # a clause term 1 − |count − n|/count can go negative
        self.spec = RewardSpec(
            name="shapes_geneval",
            version=f"1/{judgement}/{score_variant}",
            description="GenEval rules on the shapes world's rule-based detections",
            value_range=(low, 1.0),
        )

    def __call__(self, images: Tensor, prompts: Sequence[Prompt]) -> Tensor:
        results = judge_images(images, prompts, score_variant=self.score_variant)
        return torch.tensor([float(getattr(r, self.judgement)) for r in results], dtype=torch.float32)
