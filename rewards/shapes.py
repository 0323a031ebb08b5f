"""The shapes world's GenEval reward: the rule-based detector feeding the GenEval rule engine.

The judge itself is :func:`harness.shapes_world.judge.judge_images`, shared with the shapes benchmark's metric.

``judgement="score"`` is FlowGRPO's partial-credit training reward; ``"correct"`` is the
official GenEval rule (the eval metric); ``"strict"`` is FlowGRPO's strict variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from harness.geneval_rules import ScoreVariant
from harness.shapes_world.judge import judge_images
from harness.types import Prompt, RewardSpec, check_images

Judgement = Literal["score", "correct", "strict"]


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
        check_images(self.spec.name, images)
        results = judge_images(images, prompts, score_variant=self.score_variant)
        return torch.tensor([float(getattr(r, self.judgement)) for r in results], dtype=torch.float32)
