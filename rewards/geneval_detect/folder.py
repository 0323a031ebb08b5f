"""Score a folder of images laid out as GenEval's generator writes it (djghosh13/geneval).

Layout (``generation/diffusers_generate.py``)::

    IMAGE_DIR/00000/metadata.jsonl      one JSON object: the prompt's GenEval metadata
    IMAGE_DIR/00000/samples/0000.png    the prompt's images (4 by default)

As ``evaluation/evaluate_images.py``, entries of IMAGE_DIR whose name is not all digits are skipped,
and in ``samples/`` only files named ``<digits>.png`` are read. Each image gets the official
``correct`` judgement (plus FlowGRPO's ``strict`` and partial ``score``). The summary follows
``evaluation/summary_scores.py``: image accuracy, prompt accuracy (a prompt is correct when any of
its images is), per-task image accuracy, and ``overall`` = the unweighted mean of the task accuracies.

Deviation: the per-image JSONL stores ``metadata`` as a JSON object, not a JSON string, and adds
``strict``, ``score``, ``colors``, ``backend`` and ``color_model``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from harness.geneval_rules import TASKS, MetadataError, ScoreVariant, task_summary, validate_metadata
from rewards.geneval_detect.base import BackendName, Detector
from rewards.geneval_detect.color import ClipBackend, ColorClassifier

logger = logging.getLogger(__name__)

SAMPLE_NAME = re.compile(r"\d+\.png")


class FolderError(ValueError):
    """A GenEval image folder is malformed; the message names the offending path."""


@dataclass(frozen=True)
class PromptFolder:
    """One ``<index>/`` folder: its metadata and its sample images, in numeric order."""

    index: str
    path: Path
    metadata: dict[str, Any]
    images: tuple[Path, ...]


@dataclass(frozen=True)
class PromptSummary:
    """How the images of one prompt fared under the official rule."""

    index: str
    prompt: str
    tag: str
    n_images: int
    n_correct: int

    @property
    def correct(self) -> bool:
        """GenEval counts a prompt correct when any of its images is."""
        return self.n_correct > 0


@dataclass(frozen=True)
class Summary:
    """GenEval scores of an image folder (``summary_scores.py``), plus FlowGRPO's strict and partial means.

    ``tasks``: per-task image accuracy (the official rule) in GenEval's task order; ``overall`` = their
    unweighted mean (GenEval's headline number). ``strict`` / ``score``: the same for FlowGRPO's strict
    judgement and partial score, each with its own ``overall`` key.
    """

    backend: str
    color_model: str
    n_images: int
    n_prompts: int
    image_accuracy: float
    prompt_accuracy: float
    overall: float
    tasks: dict[str, float]
    strict: dict[str, float]
    score: dict[str, float]
    prompts: tuple[PromptSummary, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; each prompt entry carries its ``correct`` flag."""
        out = asdict(self)
        out["prompts"] = [{**asdict(p), "correct": p.correct} for p in self.prompts]
        return out

    def table(self) -> str:
        """A Markdown table of the per-task accuracies, ``overall`` last."""
        rows = [f"| {task} | {value:.4f} |" for task, value in self.tasks.items()]
        return "\n".join(["| task | accuracy |", "|---|---|", *rows, f"| overall | {self.overall:.4f} |"])


def _read_metadata(path: Path, class_names: Sequence[str]) -> dict[str, Any]:
    if not path.is_file():
        raise FolderError(f"{path} is missing; each <index>/ folder needs the prompt's metadata.jsonl")
    text = path.read_text(encoding="utf-8").strip()
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise FolderError(f"{path} must hold one JSON object (GenEval metadata): {error}") from None
    try:
        validate_metadata(metadata, class_names)
        if not isinstance(metadata.get("prompt"), str) or not metadata["prompt"]:
            raise MetadataError("metadata['prompt'] must be a non-empty string")
    except MetadataError as error:
        raise FolderError(f"{path}: {error}") from None
    return metadata


def read_image_folder(image_dir: Path, class_names: Sequence[str]) -> list[PromptFolder]:
    """Every ``<index>/`` folder of ``image_dir``, checked; raises :class:`FolderError` naming the bad path."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FolderError(f"GenEval image folder {image_dir} does not exist or is not a directory")
    folders = []
    for entry in sorted((p for p in image_dir.iterdir() if p.name.isdigit() and p.is_dir()), key=lambda p: int(p.name)):
        metadata = _read_metadata(entry / "metadata.jsonl", class_names)
        samples = entry / "samples"
        if not samples.is_dir():
            raise FolderError(f"{samples} is missing; expected the prompt's images as samples/<n>.png")
        images = sorted((p for p in samples.iterdir() if SAMPLE_NAME.fullmatch(p.name)), key=lambda p: int(p.stem))
        if not images:
            raise FolderError(f"{samples} holds no image named <digits>.png")
        folders.append(PromptFolder(entry.name, entry, metadata, tuple(images)))
    if not folders:
        raise FolderError(
            f"{image_dir} has no <index>/ subfolder (digits only, e.g. 00000/ with metadata.jsonl and samples/0000.png)"
        )
    return folders


def load_rgb(path: Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3), EXIF orientation applied (as the official evaluator)."""
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (UnidentifiedImageError, OSError) as error:
        raise FolderError(f"{path} is not a readable image: {error}") from None


def summarize(
    records: Sequence[dict[str, Any]], folders: Sequence[PromptFolder], backend: str, color_model: str
) -> Summary:
    """The folder's :class:`Summary` from its per-image records (keys ``index``, ``correct``, ``result``)."""
    results = [r["result"] for r in records]
    correct = task_summary(results, "correct")
    by_index: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_index.setdefault(record["index"], []).append(record)
    per_prompt = []
    for folder in folders:
        mine = by_index.get(folder.index, [])
        per_prompt.append(
            PromptSummary(
                folder.index,
                folder.metadata["prompt"],
                folder.metadata["tag"],
                len(mine),
                sum(bool(r["result"].correct) for r in mine),
            )
        )
    return Summary(
        backend=backend,
        color_model=color_model,
        n_images=len(records),
        n_prompts=len(folders),
        image_accuracy=float(np.mean([r.correct for r in results])),
        prompt_accuracy=float(np.mean([p.correct for p in per_prompt])),
        overall=correct["overall"],
        tasks={t: correct[t] for t in TASKS if t in correct},
        strict=task_summary(results, "strict"),
        score=task_summary(results, "score"),
        prompts=tuple(per_prompt),
    )


def score_image_folder(
    image_dir: Path,
    out: Path | None,
    backend: BackendName | Detector = "mmdet",
    *,
    detector_path: str | Path | None = None,
    detector_config: str | Path | None = None,
    clip_path: str | Path | None = None,
    clip_backend: ClipBackend = "hf",
    device: str = "cpu",
    batch_size: int = 8,
    rgb_as_bgr: bool = False,
    class_names: str | Path | Sequence[str] | None = None,
    score_variant: ScoreVariant = "flowgrpo",
    color_classifier: ColorClassifier | None = None,
    data_dir: str | Path | None = None,
) -> Summary:
    """Score every image of a GenEval image folder; write ``out/results.jsonl`` and ``out/summary.json``.

    Checked in this order, each before the next is touched: that ``image_dir`` is a folder; the class names
    (``class_names``, else ``data_dir/geneval/object_names.txt``, else the cached public file, downloaded only
    when neither exists); the whole folder; then the reward is built and the models load. ``out=None``
    writes nothing. The other arguments are those of :class:`rewards.geneval_reward.GenEvalReward`
    (``backend="mmdet"`` is the official detector and needs ``detector_path``).
    """
    from rewards.geneval_reward import GenEvalReward, resolve_class_names

    if not Path(image_dir).is_dir():
        raise FolderError(f"GenEval image folder {image_dir} does not exist or is not a directory")
    names = resolve_class_names(class_names, data_dir)
    folders = read_image_folder(Path(image_dir), names)
    reward = GenEvalReward(
        judgement="correct",
        score_variant=score_variant,
        backend=backend,
        detector_path=detector_path,
        detector_config=detector_config,
        clip_path=clip_path,
        clip_backend=clip_backend,
        device=device,
        batch_size=batch_size,
        rgb_as_bgr=rgb_as_bgr,
        class_names=names,
        color_classifier=color_classifier,
    )
    todo = [(folder, path) for folder in folders for path in folder.images]
    records: list[dict[str, Any]] = []
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        judged = reward.judge([load_rgb(path) for _, path in chunk], [folder.metadata for folder, _ in chunk])
        for (folder, path), item in zip(chunk, judged, strict=True):
            records.append({"index": folder.index, "filename": str(path), "result": item.result, "judged": item})
        logger.info("GenEval: scored %d/%d images", len(records), len(todo))
    summary = summarize(records, folders, reward.backend, reward.colors.name)
    if out is not None:
        write_results(Path(out), records, folders, summary)
    return summary


def write_results(
    out: Path, records: Sequence[dict[str, Any]], folders: Sequence[PromptFolder], summary: Summary
) -> None:
    """``out/results.jsonl`` (one line per image) and ``out/summary.json``."""
    out.mkdir(parents=True, exist_ok=True)
    metadata = {folder.index: folder.metadata for folder in folders}
    with (out / "results.jsonl").open("w", encoding="utf-8") as fp:
        for record in records:
            judged, result = record["judged"], record["result"]
            line = {
                "filename": record["filename"],
                "index": record["index"],
                "tag": result.tag,
                "prompt": metadata[record["index"]]["prompt"],
                "correct": result.correct,
                "strict": result.strict,
                "score": result.score,
                "reason": result.reason,
                "metadata": metadata[record["index"]],
                "details": judged.details(),
                "colors": judged.colors(),
                "backend": judged.backend,
                "color_model": judged.color_model,
            }
            fp.write(json.dumps(line) + "\n")
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
