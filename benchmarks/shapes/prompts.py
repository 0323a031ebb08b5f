"""Prompt sets of the shapes world: seeded training prompts and the fixed evaluation set."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from harness.geneval_rules import TASKS, MetadataError
from harness.shapes_world.world import all_prompts

UNIFORM_TASKS: dict[str, float] = {tag: 1.0 for tag in TASKS}


def _task_weights(task_weights: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    unknown = set(task_weights) - set(TASKS)
    if unknown:
        raise MetadataError(f"unknown task(s) {sorted(unknown)} in task_weights; allowed: {', '.join(TASKS)}")
    tags = [tag for tag in TASKS if task_weights.get(tag, 0.0) > 0]
    if not tags:
        raise MetadataError("task_weights gives no task a positive weight")
    weights = np.array([task_weights[tag] for tag in tags], dtype=np.float64)
    return tags, weights / weights.sum()


def sample_prompts(
    rng: np.random.Generator, n: int, task_weights: Mapping[str, float] = UNIFORM_TASKS
) -> list[dict[str, Any]]:
    """``n`` prompts (metadata dicts): a task by weight, then a prompt uniformly within it."""
    tags, probabilities = _task_weights(task_weights)
    pools = {tag: all_prompts(tag) for tag in tags}
    chosen = rng.choice(len(tags), size=n, p=probabilities)
    return [pools[tags[k]][int(rng.integers(len(pools[tags[k]])))] for k in chosen]


def eval_prompts(prompts_per_task: int, seed: int) -> list[dict[str, Any]]:
    """The fixed evaluation set: ``prompts_per_task`` per task, in task order.

    Tasks with fewer distinct prompts than that (single_object has 4) cycle through all of them,
    so every task weighs the same in the overall score; larger tasks take a seeded sample
    without replacement.
    """
    rng = np.random.default_rng(seed)
    chosen: list[dict[str, Any]] = []
    for tag in TASKS:
        pool = all_prompts(tag)
        if len(pool) >= prompts_per_task:
            order = rng.permutation(len(pool))[:prompts_per_task]
        else:
            order = np.arange(prompts_per_task) % len(pool)
        chosen += [pool[int(i)] for i in order]
    return chosen
