"""The shapes world: its vocabulary, palette and a GenEval-style prompt grammar.

Prompts follow GenEval's templates (``prompts/create_prompts.py``) with shapes for classes:

| task | prompt | metadata ``include`` (``exclude``) |
|---|---|---|
| single_object | "a photo of a circle" | circle×1 |
| two_object | "a photo of a circle and a square" | circle×1, square×1 |
| counting | "a photo of three triangles" | triangle×3 (exclude triangle×4) |
| colors | "a photo of a red circle" | circle×1 red |
| position | "a photo of a circle left of a square" | square×1, circle×1 at ["left of", 0] |
| color_attr | "a photo of a red circle and a blue square" | circle×1 red, square×1 blue |
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from harness.geneval_rules import RELATIONS, TASKS, MetadataError, validate_metadata

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 0),
    "yellow": (240, 230, 30),
    "green": (30, 180, 50),
    "blue": (40, 80, 230),
    "purple": (150, 50, 200),
}
BACKGROUND = (0, 0, 0)
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
PLURALS = {shape: shape + "s" for shape in SHAPES}

VOCABULARY: tuple[str, ...] = (
    "<pad>", "a", "an", "photo", "of", "and", "left", "right", "above", "below",
    *COUNT_WORDS.values(), *SHAPES, *PLURALS.values(), *COLORS,
)  # fmt: skip


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(shape: str, color: str | None = None) -> str:
    phrase = f"{color} {shape}" if color else shape
    return f"{_article(phrase)} {phrase}"


def prompt_text(metadata: Mapping[str, Any]) -> str:
    """The prompt that GenEval's grammar writes for this metadata."""
    validate_shapes_metadata(metadata)
    tag, include = metadata["tag"], metadata["include"]
    if tag == "single_object":
        return f"a photo of {_noun(include[0]['class'])}"
    if tag == "two_object":
        return f"a photo of {_noun(include[0]['class'])} and {_noun(include[1]['class'])}"
    if tag == "counting":
        return f"a photo of {COUNT_WORDS[include[0]['count']]} {PLURALS[include[0]['class']]}"
    if tag == "colors":
        return f"a photo of {_noun(include[0]['class'], include[0]['color'])}"
    if tag == "position":
        target, subject = include
        return f"a photo of {_noun(subject['class'])} {subject['position'][0]} {_noun(target['class'])}"
    first, second = include
    return f"a photo of {_noun(first['class'], first['color'])} and {_noun(second['class'], second['color'])}"


def make_metadata(
    tag: str,
    shapes: tuple[str, ...],
    colors: tuple[str, ...] = (),
    count: int = 1,
    relation: str | None = None,
) -> dict[str, Any]:
    """Build GenEval metadata (with its ``prompt``) for one task; arguments are validated."""
    if tag == "single_object":
        include: list[dict[str, Any]] = [{"class": shapes[0], "count": 1}]
    elif tag == "two_object":
        include = [{"class": shapes[0], "count": 1}, {"class": shapes[1], "count": 1}]
    elif tag == "counting":
        include = [{"class": shapes[0], "count": count}]
    elif tag == "colors":
        include = [{"class": shapes[0], "count": 1, "color": colors[0]}]
    elif tag == "position":
        include = [{"class": shapes[1], "count": 1}, {"class": shapes[0], "count": 1, "position": [relation, 0]}]
    elif tag == "color_attr":
        include = [
            {"class": shapes[0], "count": 1, "color": colors[0]},
            {"class": shapes[1], "count": 1, "color": colors[1]},
        ]
    else:
        raise MetadataError(f"unknown task {tag!r}; allowed: {', '.join(TASKS)}")
    metadata: dict[str, Any] = {"tag": tag, "include": include}
    if tag == "counting":
        metadata["exclude"] = [{"class": shapes[0], "count": count + 1}]
    metadata["prompt"] = prompt_text(metadata)
    return metadata


def validate_shapes_metadata(metadata: Mapping[str, Any]) -> None:
    """GenEval's structural checks plus the shapes world's vocabulary and task shapes."""
    validate_metadata(metadata, known_classes=SHAPES)
    tag, include = metadata["tag"], metadata["include"]
    for i, clause in enumerate(include):
        if "color" in clause and clause["color"] not in COLORS:
            raise MetadataError(
                f"metadata['include'][{i}]['color'] = {clause['color']!r}; allowed: {', '.join(COLORS)}"
            )
    expected = {"single_object": 1, "two_object": 2, "counting": 1, "colors": 1, "position": 2, "color_attr": 2}[tag]
    if len(include) != expected:
        raise MetadataError(f"task {tag!r} takes {expected} include clause(s), got {len(include)}")
    if tag == "counting" and include[0]["count"] not in COUNT_WORDS:
        raise MetadataError(f"counting: include[0]['count'] = {include[0]['count']}; allowed: {sorted(COUNT_WORDS)}")
    if tag != "counting" and any(c["count"] != 1 for c in include):
        raise MetadataError(f"task {tag!r} takes count 1 in every include clause")
    if tag in ("colors", "color_attr") and not all("color" in c for c in include):
        raise MetadataError(f"task {tag!r} needs a 'color' in every include clause")
    if tag == "position" and "position" not in include[1]:
        raise MetadataError("task 'position' needs include[1]['position'] = [relation, 0]")
    if len(include) == 2 and include[0]["class"] == include[1]["class"]:
        raise MetadataError(f"task {tag!r} needs two different shapes, got {include[0]['class']!r} twice")


_NOUN = r"an? (?:(?P<c{i}>\w+) )?(?P<s{i}>\w+)"
_PATTERNS = {
    "counting": re.compile(r"a photo of (?P<n>two|three|four) (?P<s0>\w+)"),
    "position": re.compile(
        rf"a photo of {_NOUN.format(i=0)} (?P<rel>left of|right of|above|below) {_NOUN.format(i=1)}"
    ),
    "pair": re.compile(rf"a photo of {_NOUN.format(i=0)} and {_NOUN.format(i=1)}"),
    "single": re.compile(rf"a photo of {_NOUN.format(i=0)}"),
}


def check_words(text: str) -> list[str]:
    """Split a prompt into vocabulary words; raise naming any unknown word and the vocabulary."""
    words = text.strip().lower().split()
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        shown = ", ".join(w for w in VOCABULARY if w != "<pad>")
        raise MetadataError(f"prompt {text!r} has words outside the shapes vocabulary: {unknown}. Allowed: {shown}")
    return words


def parse_prompt(text: str) -> dict[str, Any]:
    """Invert the grammar: prompt text → GenEval metadata. Errors name the unknown part."""
    check_words(text)
    text = " ".join(text.strip().lower().split())

    def shape(word: str) -> str:
        if word in SHAPES:
            return word
        raise MetadataError(f"{word!r} in prompt {text!r} is not a shape; allowed: {', '.join(SHAPES)}")

    def color(word: str | None) -> str | None:
        if word is None or word in COLORS:
            return word
        raise MetadataError(f"{word!r} in prompt {text!r} is not a colour; allowed: {', '.join(COLORS)}")

    if m := _PATTERNS["counting"].fullmatch(text):
        singular = {v: k for k, v in PLURALS.items()}.get(m["s0"])
        if singular is None:
            raise MetadataError(
                f"counting prompt {text!r} needs a plural shape; allowed: {', '.join(PLURALS.values())}"
            )
        count = {v: k for k, v in COUNT_WORDS.items()}[m["n"]]
        return make_metadata("counting", (singular,), count=count)
    if m := _PATTERNS["position"].fullmatch(text):
        if m["c0"] or m["c1"]:
            raise MetadataError(f"position prompts take no colours: {text!r}")
        return make_metadata("position", (shape(m["s0"]), shape(m["s1"])), relation=m["rel"])
    if m := _PATTERNS["pair"].fullmatch(text):
        colors = (color(m["c0"]), color(m["c1"]))
        if colors[0] and colors[1]:
            return make_metadata("color_attr", (shape(m["s0"]), shape(m["s1"])), colors=colors)  # type: ignore[arg-type]
        if colors[0] or colors[1]:
            raise MetadataError(f"colour both shapes or neither: {text!r}")
        return make_metadata("two_object", (shape(m["s0"]), shape(m["s1"])))
    if m := _PATTERNS["single"].fullmatch(text):
        if m["c0"]:
            return make_metadata("colors", (shape(m["s0"]),), colors=(color(m["c0"]),))  # type: ignore[arg-type]
        return make_metadata("single_object", (shape(m["s0"]),))
    raise MetadataError(
        f"prompt {text!r} matches none of the grammar's templates: 'a photo of a <shape>', "
        "'... a <shape> and a <shape>', '... <two|three|four> <shapes>', '... a <color> <shape>', "
        f"'... a <shape> <{'|'.join(RELATIONS)}> a <shape>', '... a <color> <shape> and a <color> <shape>'"
    )


def all_prompts(tag: str) -> list[dict[str, Any]]:
    """Every distinct prompt of one task, in a fixed order."""
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    if tag == "single_object":
        return [make_metadata(tag, (s,)) for s in SHAPES]
    if tag == "two_object":
        return [make_metadata(tag, p) for p in pairs]
    if tag == "counting":
        return [make_metadata(tag, (s,), count=n) for s in SHAPES for n in COUNT_WORDS]
    if tag == "colors":
        return [make_metadata(tag, (s,), colors=(c,)) for s in SHAPES for c in COLORS]
    if tag == "position":
        return [make_metadata(tag, p, relation=r) for p in pairs for r in RELATIONS]
    if tag == "color_attr":
        return [make_metadata(tag, p, colors=(c0, c1)) for p in pairs for c0 in COLORS for c1 in COLORS if c0 != c1]
    raise MetadataError(f"unknown task {tag!r}; allowed: {', '.join(TASKS)}")
