"""The GenEval image-folder scorer on a tmp folder in the generator's layout, with a scripted detector."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from rewards.geneval_detect.folder import FolderError, score_image_folder
from tests.rewards.geneval_fakes import PaletteColors, ScriptedDetector, paint

SINGLE = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}
COLORS = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}
COUNTING = {
    "tag": "counting",
    "include": [{"class": "cat", "count": 2}],
    "exclude": [{"class": "cat", "count": 3}],
    "prompt": "a photo of two cats",
}


@pytest.fixture
def class_names(shared_data):
    return (shared_data / "geneval" / "object_names.txt").read_text().splitlines()


def write_prompt(root: Path, index: int, metadata: dict, images: list) -> Path:
    folder = root / f"{index:05d}"
    (folder / "samples").mkdir(parents=True)
    (folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n")
    for k, image in enumerate(images):
        Image.fromarray(image).save(folder / "samples" / f"{k:04d}.png")
    return folder


def generated_folder(root: Path):
    """3 prompts × 2 images; returns the detector script in the scorer's reading order."""
    dog, dog_found = paint([("dog", (0, 0, 10, 10), None, 0.8)])
    nothing, _ = paint([])
    blue_car, blue_found = paint([("car", (5, 5, 25, 20), "blue", 0.9)])
    red_car, red_found = paint([("car", (5, 5, 25, 20), "red", 0.2)])  # red but below 0.3
    cats, cats_found = paint([("cat", (0, 0, 10, 10), None, 0.95), ("cat", (20, 0, 30, 10), None, 0.91)])
    write_prompt(root, 0, SINGLE, [dog, nothing])
    write_prompt(root, 1, COLORS, [blue_car, red_car])
    write_prompt(root, 10, COUNTING, [cats, cats])  # numeric order: 00010 after 00001
    (root / "notes.txt").write_text("not a prompt folder")
    (root / "results").mkdir()
    (root / "00000" / "samples" / "grid.png").write_bytes(b"skipped: not <digits>.png")
    return [dog_found, {}, blue_found, red_found, cats_found, cats_found]


def test_folder_scorer_writes_per_image_results_and_the_official_summary(tmp_path, class_names):
    script = generated_folder(tmp_path / "images")
    detector = ScriptedDetector(script)
    summary = score_image_folder(
        tmp_path / "images",
        tmp_path / "out",
        detector,
        batch_size=4,
        class_names=class_names,
        color_classifier=PaletteColors(),
    )
    assert detector.calls == [(4, 0.3), (2, 0.3)]
    assert summary.tasks == {"single_object": 0.5, "counting": 1.0, "colors": 0.0}
    assert summary.overall == pytest.approx(0.5)  # mean over tasks, not over images
    assert summary.image_accuracy == pytest.approx(3 / 6) and summary.prompt_accuracy == pytest.approx(2 / 3)
    assert (summary.n_images, summary.n_prompts, summary.backend) == (6, 3, "fake:0")
    assert [(p.index, p.n_images, p.n_correct, p.correct) for p in summary.prompts] == [
        ("00000", 2, 1, True),
        ("00001", 2, 0, False),
        ("00010", 2, 2, True),
    ]
    assert summary.strict["counting"] == 1.0 and summary.score["single_object"] == pytest.approx(0.5)

    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [Path(r["filename"]).relative_to(tmp_path / "images").as_posix() for r in lines] == [
        "00000/samples/0000.png",
        "00000/samples/0001.png",
        "00001/samples/0000.png",
        "00001/samples/0001.png",
        "00010/samples/0000.png",
        "00010/samples/0001.png",
    ]
    first, blue = lines[0], lines[2]
    assert (
        first["correct"] is True and first["details"] == {"dog": [[0, 0, 10, 10, 0.8]]} and first["backend"] == "fake:0"
    )
    assert blue["colors"] == {"car": ["blue"]} and "expected red car>=1, found 0 (blue)" in blue["reason"]
    assert lines[3]["details"] == {} and lines[3]["metadata"] == COLORS and lines[3]["color_model"] == "palette"
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary.to_dict())) and saved["prompts"][1]["correct"] is False
    assert "| overall | 0.5000 |" in summary.table()


def test_no_out_writes_nothing(tmp_path, class_names):
    script = generated_folder(tmp_path / "images")
    before = sorted(p for p in tmp_path.rglob("*"))
    summary = score_image_folder(
        tmp_path / "images", None, ScriptedDetector(script), class_names=class_names, color_classifier=PaletteColors()
    )
    assert summary.n_images == 6 and sorted(p for p in tmp_path.rglob("*")) == before


def break_folder(root: Path, how: str) -> Path:
    """Make a malformed folder; returns the path the error must name."""
    ok, _ = paint([])
    if how == "missing":
        return root
    root.mkdir()
    if how == "empty":
        (root / "readme.txt").write_text("x")
        return root
    folder = write_prompt(root, 0, SINGLE, [ok])
    if how == "no-metadata":
        (folder / "metadata.jsonl").unlink()
        return folder / "metadata.jsonl"
    if how == "bad-json":
        (folder / "metadata.jsonl").write_text('{"tag": "single_object",')
        return folder / "metadata.jsonl"
    if how == "bad-metadata":
        (folder / "metadata.jsonl").write_text(json.dumps({**SINGLE, "include": [{"class": "unicorn", "count": 1}]}))
        return folder / "metadata.jsonl"
    if how == "no-prompt":
        (folder / "metadata.jsonl").write_text(json.dumps({k: v for k, v in SINGLE.items() if k != "prompt"}))
        return folder / "metadata.jsonl"
    if how == "no-samples":
        for p in (folder / "samples").iterdir():
            p.unlink()
        (folder / "samples").rmdir()
        return folder / "samples"
    if how == "no-png":
        (folder / "samples" / "0000.png").rename(folder / "samples" / "0000.jpg")
        return folder / "samples"
    if how == "unreadable":
        (folder / "samples" / "0000.png").write_bytes(b"not a png")
        return folder / "samples" / "0000.png"
    raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "has no <index>/ subfolder"),
        ("no-metadata", "is missing"),
        ("bad-json", "must hold one JSON object"),
        ("bad-metadata", "'unicorn' is not a known class"),
        ("no-prompt", "metadata\\['prompt'\\] must be a non-empty string"),
        ("no-samples", "is missing; expected the prompt's images"),
        ("no-png", "holds no image named <digits>.png"),
        ("unreadable", "is not a readable image"),
    ],
)
def test_malformed_folders_raise_naming_the_path(tmp_path, class_names, how, message):
    bad = break_folder(tmp_path / "images", how)
    detector = ScriptedDetector([{}])
    with pytest.raises(FolderError, match=re.escape(str(bad)) + ".*" + message):
        score_image_folder(
            tmp_path / "images", tmp_path / "out", detector, class_names=class_names, color_classifier=PaletteColors()
        )
    assert detector.calls == [] and not (tmp_path / "out").exists()


def test_cli_refuses_a_malformed_folder_before_loading_any_model(tmp_path, shared_data, capsys):
    from harness.cli import USER_ERROR, main

    (tmp_path / "00000").mkdir()
    names = str(shared_data / "geneval" / "object_names.txt")
    assert main(["geneval", str(tmp_path), "--backend", "hf", "--class-names", names]) == USER_ERROR
    assert re.fullmatch(r"diffrl geneval: \S*00000/metadata\.jsonl is missing.*\n", capsys.readouterr().err)
