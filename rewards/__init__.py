"""Reward registry: one line per reward (``name → "module:factory"``), imported lazily."""

from harness.registry import Registry

REWARDS: Registry = Registry("reward")
REWARDS.add(
    "shapes_geneval", "rewards.shapes:ShapesGenEval", "GenEval rules on the shapes world (partial credit by default)"
)
