"""The shapes benchmark: GenEval's six tasks on procedural 32×32 images, judged by rules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from benchmarks.shapes.prompts import UNIFORM_TASKS, eval_prompts, sample_prompts
from harness.geneval_rules import TASKS, task_summary
from harness.shapes_world.judge import judge_and_count
from harness.types import Prompt
from harness.validation import require


@dataclass(frozen=True, kw_only=True)
class ShapesBenchmark:
    """Eval: ``prompts_per_task`` fixed prompts per task × ``images_per_prompt`` seeded images.

    The headline metric is GenEval's: per-task accuracy under the official rule and ``overall``
    = the unweighted mean of the six task accuracies. ``strict_overall`` (FlowGRPO's exact-count
    rule) and ``partial_overall`` (the mean partial-credit training score) are reported beside it, with
    ``extra_objects``: the mean number of detections (score > 0.3, any class) beyond the objects the prompt
    asks for — the clutter that GenEval's "at least ``count``" rule lets pass (lower is better).
    """

    name: str = "shapes"
    version: str = "1"
    prompts_per_task: int = 16
    images_per_prompt: int = 4
    eval_seed: int = 1234
    task_weights: Mapping[str, float] = field(default_factory=lambda: dict(UNIFORM_TASKS))
    metrics: tuple[str, ...] = ("overall", *TASKS, "strict_overall", "partial_overall", "extra_objects")

    def __post_init__(self) -> None:
        # The eval set's size (suite: benchmark.options): 6 · prompts_per_task · images_per_prompt images.
        for name in ("prompts_per_task", "images_per_prompt"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, value,
                    "an integer >= 1")  # fmt: skip

    def train_prompts(self, n: int, rng: np.random.Generator) -> list[Prompt]:
        return [Prompt(md["prompt"], md) for md in sample_prompts(rng, n, self.task_weights)]

    def eval_prompts(self) -> list[Prompt]:
        return [Prompt(md["prompt"], md) for md in eval_prompts(self.prompts_per_task, self.eval_seed)]

    def evaluate(self, images: Tensor, prompts: Sequence[Prompt]) -> dict[str, float]:
        results, surplus = judge_and_count(images, prompts)
        summary = task_summary(results, "correct")
        strict = task_summary(results, "strict")
        partial = task_summary(results, "score")
        return {
            "overall": summary.pop("overall"),
            **summary,
            "strict_overall": strict["overall"],
            "partial_overall": partial["overall"],
            "extra_objects": sum(surplus) / len(surplus),
        }
