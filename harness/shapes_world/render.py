"""Procedural renderer: GenEval metadata → a small RGB image that satisfies it.

Objects are solid, aliased palette-coloured shapes on a black background, separated by at
least ``GAP`` pixels so that every object is its own connected component. Placement is by
rejection sampling; a position clause is accepted only when :func:`relative_position` gives
exactly the requested relation, so the judge's own rule defines "left of".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from harness.geneval_rules import relative_position
from harness.shapes_world.world import BACKGROUND, COLORS, IMAGE_SIZE, SHAPES, validate_shapes_metadata

GAP = 2
SIZE_RANGE = (7, 11)  # inclusive side length of an object's bounding box, pixels
COUNTING_SIZE_RANGE = (7, 9)  # smaller objects so that three or four fit
MAX_TRIES = 1000


@dataclass(frozen=True)
class PlacedObject:
    """One rendered object; ``box`` uses pixel edges: (x1, y1, x2, y2) with x2 = x1 + size."""

    shape: str
    color: str
    box: tuple[int, int, int, int]


@cache
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape filling its bounding box."""
    centre = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    if shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        mask = (x - centre) ** 2 + (y - centre) ** 2 <= (size / 2) ** 2
    elif shape == "triangle":  # apex up, base on the bottom row
        mask = np.abs(x - centre) <= (y + 1) / size * (size / 2)
    elif shape == "diamond":
        mask = np.abs(x - centre) + np.abs(y - centre) <= size / 2
    else:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")
    return mask


def _boxes_clear(box: tuple[int, int, int, int], others: list[PlacedObject]) -> bool:
    return all(
        box[0] >= o.box[2] + GAP or o.box[0] >= box[2] + GAP or box[1] >= o.box[3] + GAP or o.box[1] >= box[3] + GAP
        for o in others
    )


def _random_box(rng: np.random.Generator, size_range: tuple[int, int]) -> tuple[int, int, int, int]:
    size = int(rng.integers(size_range[0], size_range[1] + 1))
    x1, y1 = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
    return (x1, y1, x1 + size, y1 + size)


def layout(metadata: Mapping[str, Any], rng: np.random.Generator) -> list[PlacedObject]:
    """Choose shapes, colours and non-touching boxes that satisfy the metadata."""
    validate_shapes_metadata(metadata)
    wanted: list[tuple[str, str | None, tuple[str, int] | None]] = []
    for clause in metadata["include"]:
        position = tuple(clause["position"]) if "position" in clause else None
        wanted += [(clause["class"], clause.get("color"), position)] * clause["count"]  # type: ignore[list-item]
    size_range = COUNTING_SIZE_RANGE if len(wanted) >= 3 else SIZE_RANGE
    palette = list(COLORS)
    for _ in range(MAX_TRIES):
        placed: list[PlacedObject] = []
        for shape, color, position in wanted:
            box = _random_box(rng, size_range)
            if not _boxes_clear(box, placed):
                break
            if position is not None:
                relation, target = position
                if relative_position(box, placed[target].box) != {relation}:
                    break
            placed.append(PlacedObject(shape, color or palette[int(rng.integers(len(palette)))], box))
        else:
            return placed
    raise RuntimeError(f"could not place {metadata['prompt']!r} in {MAX_TRIES} tries")


def add_distractors(
    objects: list[PlacedObject], n: int, rng: np.random.Generator, size_range: tuple[int, int] = SIZE_RANGE
) -> list[PlacedObject]:
    """``objects`` plus up to ``n`` random shapes the prompt does not mention, clear of the others.

    Pretraining's model of web captions, which describe only part of a picture; a distractor that
    finds no free place after ``MAX_TRIES`` draws is dropped.
    """
    placed = list(objects)
    for _ in range(n):
        for _ in range(MAX_TRIES):
            box = _random_box(rng, size_range)
            if _boxes_clear(box, placed):
                shape, color = SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))]
                placed.append(PlacedObject(shape, color, box))
                break
    return placed


def draw(objects: list[PlacedObject]) -> np.ndarray:
    """Paint objects onto the background: (IMAGE_SIZE, IMAGE_SIZE, 3) uint8."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in objects:
        x1, y1, x2, _ = obj.box
        mask = shape_mask(obj.shape, x2 - x1)
        region = image[y1 : y1 + mask.shape[0], x1 : x1 + mask.shape[1]]
        region[mask] = COLORS[obj.color]
    return image


def render(metadata: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    """A ground-truth image for the metadata: (IMAGE_SIZE, IMAGE_SIZE, 3) uint8."""
    return draw(layout(metadata, rng))
