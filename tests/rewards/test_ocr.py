"""OCR reward: FlowGRPO's formula on hand cases, reading order, and real engines on rendered text."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from benchmarks import BENCHMARKS
from harness.types import Prompt, Reward, RewardError
from rewards import REWARDS
from rewards.ocr import (
    OCRReward,
    RapidOCREngine,
    TesseractEngine,
    TextBox,
    make_engine,
    ocr_reward,
    ocr_target,
    parse_paddle2,
    parse_paddle3,
    parse_tesseract_tsv,
    reading_order,
    recognized_text,
)

# --- the formula ---------------------------------------------------------------------------------


def test_substring_scores_one():
    assert ocr_reward('a sign saying "OPEN"', "WeareOPENtoday") == 1.0


def test_one_edit_costs_one_over_length():
    assert ocr_reward('a sign saying "hello"', "helo") == pytest.approx(1 - 1 / 5)
    assert ocr_reward('a sign saying "hello"', "hallo") == pytest.approx(1 - 1 / 5)


def test_distance_is_capped_at_target_length():
    # Levenshtein("abcdefghijkl", "xy") = 12 > len("xy") = 2, so the reward is 0, not negative.
    assert ocr_reward('a "xy" poster', "abcdefghijkl") == 0.0
    assert ocr_reward('a "xy" poster', "") == 0.0


def test_case_and_spaces_are_folded_on_both_sides():
    assert ocr_reward('a banner with "Spring Sale 2024"', "spring sale2024") == 1.0
    assert ocr_reward('a banner with "spring sale"', "S P R I N G  S A L E") == 1.0
    # Folding is not normalisation of punctuation: "sale!" vs "sale" is one insertion in 5.
    assert ocr_reward('a "sale!" sign', "SALE") == pytest.approx(1 - 1 / 5)


def test_only_the_first_quoted_span_is_the_target():
    prompt = 'a shop sign "CAFE" next to a poster saying "BAR"'
    assert ocr_target(prompt) == "CAFE"
    assert ocr_reward(prompt, "CAFE") == 1.0
    assert ocr_reward(prompt, "BAR") < 1.0


def test_missing_or_empty_target_raises_instead_of_scoring_zero():
    with pytest.raises(ValueError, match='no "quoted" target'):
        ocr_reward("a sign with no quotes", "anything")
    with pytest.raises(ValueError, match='no "quoted" target'):
        ocr_reward('one stray " quote', "anything")
    with pytest.raises(ValueError, match="empty"):
        ocr_reward('an empty "  " span', "anything")


# --- reading order -------------------------------------------------------------------------------


def box(text, x1, y1, x2, y2):
    return TextBox(text, 0.9, (x1, y1, x2, y2))


def test_reading_order_is_top_to_bottom_then_left_to_right():
    # Line 1: "NEW" at left sits 4 px lower than "YORK" at right; line 2 below both.
    boxes = [box("CITY", 10, 60, 80, 90), box("YORK", 100, 8, 180, 40), box("NEW", 10, 12, 80, 44)]
    assert [b.text for b in reading_order(boxes)] == ["NEW", "YORK", "CITY"]
    assert recognized_text(boxes) == "NEWYORKCITY"


def test_reading_order_keeps_separate_lines_apart():
    # A right-hand box whose centre lies below the first line's span starts a new line.
    boxes = [box("B", 100, 30, 150, 60), box("A", 0, 0, 50, 25)]
    assert [b.text for b in reading_order(boxes)] == ["A", "B"]
    assert reading_order([]) == []


# --- engine output parsers -----------------------------------------------------------------------


def test_parse_tesseract_tsv_keeps_words_with_confidence():
    header = "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\tconf\ttext"
    rows = [
        "1\t1\t0\t0\t0\t0\t0\t0\t400\t200\t-1\t",
        "5\t1\t1\t1\t1\t1\t20\t40\t100\t30\t96.5\tHello",
        "5\t1\t1\t1\t1\t2\t130\t40\t90\t30\t91\tWorld",
        "5\t1\t1\t1\t1\t3\t230\t40\t10\t30\t95\t ",
    ]
    boxes = parse_tesseract_tsv("\n".join([header, *rows]))
    assert [(b.text, b.box) for b in boxes] == [("Hello", (20, 40, 120, 70)), ("World", (130, 40, 220, 70))]
    assert boxes[0].confidence == pytest.approx(0.965)
    with pytest.raises(RewardError, match="header"):
        parse_tesseract_tsv("garbage")


def test_parse_paddle_outputs():
    poly = [[1, 2], [30, 2], [30, 12], [1, 12]]
    v2 = [[[poly, ("Hi", 0.9)], [poly, ("drop", 0.0)]]]
    assert [(b.text, b.box) for b in parse_paddle2(v2)] == [("Hi", (1, 2, 30, 12))]
    assert parse_paddle2([None]) == []
    v3 = [{"rec_texts": ["Hi"], "rec_scores": [0.8], "rec_polys": [np.array(poly)]}]
    assert [(b.text, b.confidence) for b in parse_paddle3(v3)] == [("Hi", 0.8)]


def test_unknown_engine_and_bad_device_are_rejected():
    with pytest.raises(ValueError, match="unknown OCR engine"):
        make_engine("easyocr")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device"):
        make_engine("rapidocr", device="tpu")


def test_missing_tesseract_binary_says_how_to_install():
    with pytest.raises(RewardError, match="apt-get install -y tesseract-ocr"):
        TesseractEngine(binary="tesseract-not-installed-here")


# --- engines behind fakes (fast: no models) ------------------------------------------------------


class FakeRapidOCR:
    """Stands in for ``rapidocr.RapidOCR`` (3.x): records what it is given, reads one fixed box."""

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, dict]] = []

    def __call__(self, image, **kwargs):
        self.calls.append((image, kwargs))
        boxes = np.array([[[1, 2], [30, 2], [30, 12], [1, 12]]], dtype=np.float32)
        return SimpleNamespace(boxes=boxes, txts=("OPEN",), scores=(0.9,))  # the fields of a RapidOCROutput


def rapid_with_fake(rgb_as_bgr: bool) -> tuple[OCRReward, FakeRapidOCR]:
    engine = RapidOCREngine(rgb_as_bgr=rgb_as_bgr)
    engine._ocr = engine_fake = FakeRapidOCR()
    return OCRReward(engine), engine_fake


@pytest.mark.parametrize("rgb_as_bgr", [False, True])
def test_rapidocr_gets_bgr_or_the_flowgrpo_quirk_and_no_angle_classifier(rgb_as_bgr):
    reward, fake = rapid_with_fake(rgb_as_bgr)
    images = torch.zeros(2, 3, 8, 8)
    images[:, 0] = 1.0  # pure red in RGB
    scores = reward(images, [Prompt('a sign "OPEN"'), Prompt('a sign "SHUT"')])
    assert scores.tolist() == [1.0, 0.0] and [r.recognized for r in reward.last_results] == ["OPEN", "OPEN"]
    image, kwargs = fake.calls[0]
    assert kwargs == {"use_cls": False}  # FlowGRPO: use_angle_cls=False, cls=False
    # RapidOCR reads an ndarray as BGR: red sits in channel 2 unless the quirk hands it RGB as is.
    assert image.shape == (8, 8, 3) and image[0, 0].tolist() == ([255, 0, 0] if rgb_as_bgr else [0, 0, 255])


class FixedEngine:
    """An OCREngine that returns ``results`` or raises ``error``."""

    name, version = "fixed", "0"

    def __init__(self, results=None, error: Exception | None = None) -> None:
        self.results, self.error = results, error

    def read(self, images):
        if self.error is not None:
            raise self.error
        return self.results


def test_engine_failures_become_reward_errors():
    images, prompts = torch.zeros(2, 3, 8, 8), [Prompt('a "x"'), Prompt('a "y"')]
    with pytest.raises(RewardError, match="returned 1 results for 2 images"):
        OCRReward(FixedEngine(results=[[]]))(images, prompts)
    with pytest.raises(RewardError, match=r"'fixed' \(0\) failed on 2 image\(s\): RuntimeError: onnx session died"):
        OCRReward(FixedEngine(error=RuntimeError("onnx session died")))(images, prompts)
    assert OCRReward(FixedEngine(results=[[box("x", 0, 0, 1, 1)], []]))(images, prompts).tolist() == [1.0, 0.0]


def test_rapidocr_reading_nothing_gives_no_boxes():
    engine = RapidOCREngine()
    engine._ocr = lambda image, **kwargs: SimpleNamespace(boxes=None, txts=None, scores=None)  # nothing detected
    assert engine.read([np.zeros((8, 8, 3), dtype=np.uint8)]) == [[]]
    engine._ocr = lambda image, **kwargs: SimpleNamespace(boxes=np.zeros((0,)), txts=(), scores=())  # all dropped
    assert engine.read([np.zeros((8, 8, 3), dtype=np.uint8)]) == [[]]


def test_missing_rapidocr_or_onnxruntime_names_the_ocr_extra(monkeypatch):
    version, find_spec = importlib.metadata.version, importlib.util.find_spec

    def no_rapidocr(name: str) -> str:
        if name == "rapidocr":
            raise importlib.metadata.PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(importlib.metadata, "version", no_rapidocr)
    with pytest.raises(RewardError, match=r"'rapidocr'; install it with `pip install -e '\.\[ocr\]'`"):
        RapidOCREngine()
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name)
    )
    with pytest.raises(RewardError, match=r"onnxruntime, which is not installed; `pip install -e '\.\[ocr\]'`"):
        RapidOCREngine()


def test_missing_levenshtein_is_reported_at_construction(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "Levenshtein", None)  # `import Levenshtein` now raises ImportError
    with pytest.raises(RewardError, match="levenshtein"):
        OCRReward(FixedEngine(results=[]))


def fake_tesseract(tmp_path: Path, script: str) -> str:
    binary = tmp_path / "tesseract"
    binary.write_text("#!/bin/sh\n" + script)
    binary.chmod(0o755)
    return str(binary)


def test_tesseract_version_failure_and_timeout_raise_reward_errors(tmp_path):
    with pytest.raises(RewardError, match="--version` failed"):
        TesseractEngine(binary=fake_tesseract(tmp_path, "exit 3\n"))
    slow = TesseractEngine(
        binary=fake_tesseract(tmp_path, 'case "$1" in --version) echo "tesseract 5.9";; *) exec sleep 5;; esac\n'),
        timeout=0.3,
    )
    assert slow.version == "5.9"
    with pytest.raises(RewardError, match="timeout"):
        OCRReward(slow)(torch.zeros(1, 3, 8, 8), [Prompt('a "x"')])


def test_registered_and_follows_the_reward_protocol():
    reward = REWARDS.get("ocr")()
    assert isinstance(reward, Reward) and isinstance(reward, OCRReward)
    assert reward.spec.value_range == (0.0, 1.0) and reward.spec.higher_is_better
    assert not reward.spec.differentiable and reward.spec.version.startswith("1/rapidocr-")


# --- real engines on rendered text ---------------------------------------------------------------


def font(size: int = 48) -> ImageFont.FreeTypeFont:
    """DejaVuSans from the system or matplotlib; Pillow's bundled scalable font otherwise."""
    candidates = [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    try:
        import matplotlib

        candidates.append(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")
    except ImportError:
        pass
    for path in candidates:
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)  # Pillow >= 10.1


def render(lines: list[str], size: tuple[int, int] = (512, 256), fg="black", bg="white") -> torch.Tensor:
    """Text lines drawn with PIL → (3, H, W) float in [0, 1]."""
    image = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((24, 40 + 100 * i), line, font=font(), fill=fg)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def rapid():
    return OCRReward("rapidocr")


@pytest.mark.slow
def test_rapidocr_reads_rendered_text_and_scores_it(rapid):
    images = torch.stack(
        [render(["Hello World"]), render(["NASA 2049"], fg="yellow", bg="blue"), render(["Hello", "World"])]
    )
    prompts = [Prompt('a card saying "Hello World"'), Prompt('a sign "NASA 2049"'), Prompt('two lines "hello world"')]
    scores = rapid(images, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert [r.recognized.replace(" ", "") for r in rapid.last_results] == ["HelloWorld", "NASA2049", "HelloWorld"]
    assert scores.tolist() == [1.0, 1.0, 1.0]
    assert {(r.engine, r.engine_version) for r in rapid.last_results} == {("rapidocr", rapid.engine.version)}


@pytest.mark.slow
def test_rapidocr_wrong_word_scores_below_one(rapid):
    scores = rapid(render(["Hello Wortd"])[None], [Prompt('a card saying "Hello World"')])
    assert rapid.last_results[0].recognized.replace(" ", "") == "HelloWortd"
    assert scores.item() == pytest.approx(1 - 1 / 10)
    blank = rapid(torch.ones(1, 3, 128, 128), [Prompt('a card saying "Hello"')])
    assert rapid.last_results[0].recognized == "" and blank.item() == 0.0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract not installed (apt-get install tesseract-ocr)")
def test_tesseract_reads_rendered_text():
    reward = OCRReward("tesseract")
    images = torch.stack([render(["Hello World"]), render(["Hello Wortd"])])
    scores = reward(images, [Prompt('a card "Hello World"')] * 2)
    assert reward.spec.version.startswith("1/tesseract-")
    assert [r.recognized for r in reward.last_results] == ["HelloWorld", "HelloWortd"]
    assert scores.tolist() == pytest.approx([1.0, 0.9])


@pytest.mark.slow
def test_ocr_benchmark_scores_rendered_targets_with_the_real_engine(shared_data, rapid):
    bench = BENCHMARKS.get("ocr")(data_dir=shared_data, reward=rapid)
    prompts = [p for p in bench.eval_prompts() if len(p.metadata["target"]) <= 12][:4]
    images = torch.stack([render([p.metadata["target"]]) for p in prompts])
    assert bench.evaluate(images, prompts) == {"overall": 1.0}, [r.recognized for r in rapid.last_results]
