"""GenEval prompts: the official metadata, its class names, and a seeded training-prompt generator.

The generator follows GenEval's ``prompts/create_prompts.py`` (djghosh13/geneval) per task: the
same metadata shapes, articles ("an" before a vowel), plurals ("es" after a final "s") and
number words, so :func:`prompt_text` rebuilds every official prompt from its metadata. Tasks are
drawn with configurable weights; the default is FlowGRPO's training mix
(``dataset/merge_genevaltask.py``): position 7 : counting 5 : color_attr 3 : colors 1 : two_object 1,
single_object 0. Unlike the official script it samples with replacement and keeps duplicates.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.geneval_rules import GENEVAL_COLORS, RELATIONS, TASKS, MetadataError, validate_metadata

FLOWGRPO_TASK_WEIGHTS: dict[str, float] = {
    "position": 7.0,
    "counting": 5.0,
    "color_attr": 3.0,
    "colors": 1.0,
    "two_object": 1.0,
    "single_object": 0.0,
}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Fields: {a} / {b} = an object with its article (and colour, for colors/color_attr); {number} and
# {plural} for counting; {relation} for position, where {a} is the placed object and {b} the reference.
DEFAULT_TEMPLATES: dict[str, str] = {
    "single_object": "a photo of {a}",
    "two_object": "a photo of {a} and {b}",
    "counting": "a photo of {number} {plural}",
    "colors": "a photo of {a}",
    "position": "a photo of {a} {relation} {b}",
    "color_attr": "a photo of {a} and {b}",
}


def load_metadata(path: str | Path, known_classes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """GenEval metadata (one JSON object per line), each validated; errors name the line."""
    entries = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        entry = json.loads(line)
        try:
            validate_metadata(entry, known_classes)
            if not isinstance(entry.get("prompt"), str) or not entry["prompt"]:
                raise MetadataError("metadata['prompt'] must be a non-empty string")
        except MetadataError as error:
            raise MetadataError(f"{path}:{number}: {error}") from None
        entries.append(entry)
    return entries


def with_article(words: str) -> str:
    """ "a"/"an" + words, "an" when the first letter is a vowel (GenEval's rule)."""
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def plural(name: str) -> str:
    """GenEval's plural: "es" after a final "s", else "s" (so "skis" → "skises", as in the official set)."""
    return name + ("es" if name.endswith("s") else "s")


def prompt_text(metadata: Mapping[str, Any], templates: Mapping[str, str] = DEFAULT_TEMPLATES) -> str:
    """The prompt for GenEval metadata, rebuilt from its include clauses and the task's template."""
    tag, include = metadata["tag"], metadata["include"]

    def obj(clause: Mapping[str, Any]) -> str:
        return with_article(f"{clause['color']} {clause['class']}" if "color" in clause else clause["class"])

    if tag == "counting":
        count = include[0]["count"]
        if count >= len(NUMBERS):
            raise MetadataError(f"counting count {count} has no number word; allowed up to {len(NUMBERS) - 1}")
        return templates[tag].format(number=NUMBERS[count], plural=plural(include[0]["class"]))
    if tag == "position":  # include = [reference B, placed A with position [relation, 0]]
        return templates[tag].format(a=obj(include[1]), relation=include[1]["position"][0], b=obj(include[0]))
    if tag in ("two_object", "color_attr"):
        return templates[tag].format(a=obj(include[0]), b=obj(include[1]))
    return templates[tag].format(a=obj(include[0]))


@dataclass(frozen=True, kw_only=True)
class GenEvalPromptGenerator:
    """Seeded GenEval-style training prompts over ``classes`` (metadata in GenEval's format).

    ``colorless_classes`` never get a colour (GenEval excludes "person" from colors/color_attr);
    ``counts`` are the counting task's numbers (GenEval: 2–4).
    """

    classes: tuple[str, ...]
    task_weights: Mapping[str, float] = field(default_factory=lambda: dict(FLOWGRPO_TASK_WEIGHTS))
    colors: tuple[str, ...] = GENEVAL_COLORS
    relations: tuple[str, ...] = RELATIONS
    counts: tuple[int, ...] = (2, 3, 4)
    colorless_classes: tuple[str, ...] = ("person",)
    templates: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_TEMPLATES))

    def __post_init__(self) -> None:
        unknown = set(self.task_weights) - set(TASKS)
        if unknown:
            raise MetadataError(f"unknown task(s) {sorted(unknown)} in task_weights; allowed: {', '.join(TASKS)}")
        if not any(w > 0 for w in self.task_weights.values()) or any(w < 0 for w in self.task_weights.values()):
            raise MetadataError(f"task_weights must be >= 0 with one positive, got {dict(self.task_weights)}")
        missing = [tag for tag in TASKS if self.task_weights.get(tag, 0) > 0 and tag not in self.templates]
        if missing:
            raise MetadataError(f"templates lack the task(s) {missing}; give one format string per drawn task")
        if len(self.classes) < 2 or len(self.colorable) < 2 or len(self.colors) < 2:
            raise MetadataError("need at least 2 classes, 2 colourable classes and 2 colours")
        if not self.counts or min(self.counts) < 1 or max(self.counts) >= len(NUMBERS):
            raise MetadataError(f"counts must lie in 1..{len(NUMBERS) - 1}, got {self.counts}")

    @property
    def colorable(self) -> tuple[str, ...]:
        """Classes that may carry a colour."""
        return tuple(c for c in self.classes if c not in self.colorless_classes)

    def generate(self, n: int, rng: int | np.random.Generator) -> list[dict[str, Any]]:
        """``n`` metadata dicts (with ``prompt``); an ``int`` seeds a fresh ``np.random.default_rng``."""
        rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
        tags = [tag for tag in TASKS if self.task_weights.get(tag, 0) > 0]
        weights = np.array([self.task_weights[tag] for tag in tags], dtype=np.float64)
        probabilities = weights / weights.sum()
        # One task then one prompt per draw, so a seed's first k prompts do not depend on n.
        return [self._one(tags[int(rng.choice(len(tags), p=probabilities))], rng) for _ in range(n)]

    def _one(self, tag: str, rng: np.random.Generator) -> dict[str, Any]:
        def pick(pool: Sequence[Any], k: int) -> list[Any]:
            return [pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False)]

        metadata: dict[str, Any] = {"tag": tag}
        if tag == "single_object":
            metadata["include"] = [{"class": pick(self.classes, 1)[0], "count": 1}]
        elif tag == "two_object":
            metadata["include"] = [{"class": c, "count": 1} for c in pick(self.classes, 2)]
        elif tag == "counting":
            cls, count = pick(self.classes, 1)[0], int(pick(self.counts, 1)[0])
            metadata["include"] = [{"class": cls, "count": count}]
            metadata["exclude"] = [{"class": cls, "count": count + 1}]
        elif tag == "colors":
            metadata["include"] = [{"class": pick(self.colorable, 1)[0], "count": 1, "color": pick(self.colors, 1)[0]}]
        elif tag == "position":
            placed, reference = pick(self.classes, 2)
            relation = pick(self.relations, 1)[0]
            metadata["include"] = [
                {"class": reference, "count": 1},
                {"class": placed, "count": 1, "position": [relation, 0]},
            ]
        else:  # color_attr
            metadata["include"] = [
                {"class": c, "count": 1, "color": color}
                for c, color in zip(pick(self.colorable, 2), pick(self.colors, 2), strict=True)
            ]
        metadata["prompt"] = prompt_text(metadata, self.templates)
        return metadata
