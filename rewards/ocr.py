"""OCR reward: does the image show the prompt's quoted text? (FlowGRPO, arXiv 2505.05470, ``flow_grpo/ocr.py``).

The score is FlowGRPO's formula (identical in DiffusionNFT), see :func:`ocr_reward`. The recognised
text is every box the engine keeps, concatenated without separator in reading order
(:func:`reading_order`).

Engines sit behind a tiny interface (:class:`OCREngine`):

* ``rapidocr`` (default, extra ``ocr``): RapidOCR 3.x on onnxruntime, running the PaddleOCR det/rec
  models in ONNX that ship inside the ``rapidocr`` wheel (3.10: PP-OCRv6 small), so it runs offline.
  Its boxes are kept at recognition score ≥ 0.5, PaddleOCR's ``drop_score`` default. It is called with
  ``use_cls=False``: RapidOCR runs its angle classifier by default, while FlowGRPO builds PaddleOCR
  with ``use_angle_cls=False`` and reads with ``cls=False``. (``rapidocr-onnxruntime`` 1.x, the
  engine used before, is unmaintained and does not install on Python 3.13.)
* ``tesseract``: the Debian ``tesseract-ocr`` binary, called through its TSV output.
* ``paddle``: PaddleOCR itself (extra ``paddle``), the engine of the official code. It downloads its
  models on first use, so it needs the network or PaddleOCR's model cache.

Scores from different engines are not comparable; each :class:`OCRResult` records the engine's
name and version, and the reward's ``spec.version`` names the engine.

Deviations from the official code, on purpose:

* FlowGRPO wraps the whole score in ``try/except`` and returns 0 on any exception, so a prompt
  without a quoted span or with an empty one scores 0 silently. Here :func:`ocr_target` raises
  a ``ValueError`` naming the prompt, and any engine failure (loading, reading, a tesseract timeout,
  a wrong number of results) raises :class:`RewardError`.
* FlowGRPO hands PaddleOCR an RGB array where it expects BGR; we hand each engine the channel
  order it expects (``rgb_as_bgr=True`` reproduces the quirk for RapidOCR and PaddleOCR).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import io
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from harness.images import to_uint8
from harness.ocr_rules import ocr_target
from harness.types import Prompt, RewardError, RewardSpec, check_images

EngineName = Literal["rapidocr", "tesseract", "paddle"]


def ocr_reward(prompt: str, recognized: str) -> float:
    """FlowGRPO's OCR reward: ``1 − min(d, L) / L`` on space-free, lower-cased text.

    ``target`` is the first quoted span of ``prompt`` and ``L`` its length after folding;
    ``d`` = 0 if the target is a substring of ``recognized``, else their Levenshtein distance.
    Raises ``ValueError`` when the prompt has no (or an empty) quoted target.
    """
    import Levenshtein  # the `levenshtein` package (extras ocr/dev), as in FlowGRPO

    target = ocr_target(prompt).replace(" ", "").lower()
    text = recognized.replace(" ", "").lower()
    distance = 0 if target in text else Levenshtein.distance(text, target)
    return 1.0 - min(distance, len(target)) / len(target)


@dataclass(frozen=True)
class TextBox:
    """One recognised text box: axis-aligned bounds (x1, y1, x2, y2) in pixels, y grows downwards."""

    text: str
    confidence: float
    box: tuple[float, float, float, float]


def bounds(points: Sequence[Sequence[float]]) -> tuple[float, float, float, float]:
    """Axis-aligned bounds of a polygon given as [[x, y], ...]."""
    xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def reading_order(boxes: Sequence[TextBox]) -> list[TextBox]:
    """Sort boxes top-to-bottom, then left-to-right within a line.

    Boxes are taken by their top edge; a box joins the current line when its vertical centre
    lies inside the vertical span of the line's first box (so a word a few pixels higher
    still reads after its left neighbour), otherwise it starts a new line.
    """
    lines: list[list[TextBox]] = []
    for box in sorted(boxes, key=lambda b: (b.box[1], b.box[0])):
        centre = (box.box[1] + box.box[3]) / 2
        if lines and lines[-1][0].box[1] <= centre <= lines[-1][0].box[3]:
            lines[-1].append(box)
        else:
            lines.append([box])
    return [box for line in lines for box in sorted(line, key=lambda b: b.box[0])]


def recognized_text(boxes: Sequence[TextBox]) -> str:
    """The boxes' texts in reading order, joined without separator (FlowGRPO's ``"".join``)."""
    return "".join(box.text for box in reading_order(boxes))


class OCREngine(Protocol):
    """Reads text boxes from RGB uint8 images (H, W, 3); loads its models on first use."""

    name: str
    version: str

    def read(self, images: Sequence[np.ndarray]) -> list[list[TextBox]]: ...


def _package_version(distribution: str, extra_hint: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise RewardError(f"OCR engine needs the package {distribution!r}; install it with {extra_hint}") from None


OCR_EXTRA_HINT = "`pip install -e '.[ocr]'` (rapidocr and onnxruntime; the OCR models ship in the rapidocr wheel)"


class RapidOCREngine:
    """RapidOCR 3.x (``rapidocr`` + ``onnxruntime``): PaddleOCR det/rec models in ONNX, weights in the wheel.

    ``device="cuda"`` needs ``onnxruntime-gpu``; ``batch_size`` is the number of text crops per
    recognition pass; ``num_threads`` = -1 lets onnxruntime choose.
    """

    name = "rapidocr"

    def __init__(
        self, device: str = "cpu", batch_size: int = 6, num_threads: int = -1, rgb_as_bgr: bool = False
    ) -> None:
        self.version = _package_version("rapidocr", OCR_EXTRA_HINT)
        if importlib.util.find_spec("onnxruntime") is None:
            raise RewardError(f"the rapidocr engine runs on onnxruntime, which is not installed; {OCR_EXTRA_HINT}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"rapidocr device must be 'cpu' or 'cuda', got {device!r}")
        self.device, self.batch_size, self.num_threads, self.rgb_as_bgr = device, batch_size, num_threads, rgb_as_bgr
        self._ocr: Any = None

    def _load(self) -> Any:
        if self._ocr is None:
            from rapidocr import RapidOCR

            if self.device == "cuda":
                import onnxruntime

                if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                    raise RewardError("rapidocr on 'cuda' needs onnxruntime-gpu: `pip install onnxruntime-gpu`")
            self._ocr = RapidOCR(
                params={
                    "Global.log_level": "error",  # not a warning per image without text
                    "Rec.rec_batch_num": self.batch_size,
                    "EngineConfig.onnxruntime.intra_op_num_threads": self.num_threads,
                    "EngineConfig.onnxruntime.use_cuda": self.device == "cuda",
                }
            )
        return self._ocr

    def read(self, images: Sequence[np.ndarray]) -> list[list[TextBox]]:
        ocr = self._load()
        out = []
        for image in images:
            # RapidOCR treats an ndarray as BGR (OpenCV order). No angle classifier, as FlowGRPO's cls=False.
            result = ocr(image if self.rgb_as_bgr else np.ascontiguousarray(image[:, :, ::-1]), use_cls=False)
            boxes = () if result.boxes is None else result.boxes  # None when nothing is detected
            found = zip(boxes, result.txts or (), result.scores or (), strict=True)
            out.append([TextBox(str(text), float(conf), bounds(points)) for points, text, conf in found])
        return out


class TesseractEngine:
    """Tesseract (Debian ``tesseract-ocr``), word boxes from ``tesseract stdin stdout tsv``; CPU only.

    ``timeout``: seconds one image may take before the call is abandoned with a :class:`RewardError`.
    """

    name = "tesseract"

    def __init__(
        self, lang: str = "eng", psm: int | None = None, binary: str = "tesseract", timeout: float = 60.0
    ) -> None:
        path = shutil.which(binary)
        if path is None:
            raise RewardError(
                f"tesseract binary {binary!r} not found on PATH; install it with "
                "`apt-get install -y tesseract-ocr` (Debian/Ubuntu) or `brew install tesseract` (macOS)"
            )
        try:
            run = subprocess.run([path, "--version"], capture_output=True, text=True, check=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError) as error:
            raise RewardError(f"`{path} --version` failed, so tesseract is not usable: {error}") from error
        first = run.stdout.splitlines()
        self.binary, self.lang, self.psm, self.timeout = path, lang, psm, timeout
        self.version = first[0].split()[-1] if first else "unknown"

    def read(self, images: Sequence[np.ndarray]) -> list[list[TextBox]]:
        return [self._read_one(image) for image in images]

    def _read_one(self, image: np.ndarray) -> list[TextBox]:
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        command = [self.binary, "stdin", "stdout", "-l", self.lang]
        if self.psm is not None:
            command += ["--psm", str(self.psm)]
        try:
            run = subprocess.run(
                command + ["tsv"], input=png.getvalue(), capture_output=True, check=False, timeout=self.timeout
            )
        except subprocess.TimeoutExpired:
            raise RewardError(f"tesseract took over {self.timeout}s on one {image.shape} image (timeout)") from None
        except OSError as error:
            raise RewardError(f"could not run {self.binary}: {error}") from error
        if run.returncode != 0:
            raise RewardError(f"tesseract failed (exit {run.returncode}): {run.stderr.decode(errors='replace')}")
        return parse_tesseract_tsv(run.stdout.decode())


def parse_tesseract_tsv(tsv: str) -> list[TextBox]:
    """Word boxes (level 5, confidence ≥ 0, non-empty text) from Tesseract's TSV output."""
    rows = tsv.splitlines()
    header = rows[0].split("\t") if rows else []
    if header[:1] != ["level"]:
        raise RewardError(f"tesseract TSV output has no header row; got {tsv[:200]!r}")
    boxes = []
    for row in rows[1:]:
        cells = dict(zip(header, row.split("\t"), strict=False))
        text = cells.get("text", "").strip()
        if cells.get("level") != "5" or not text or float(cells["conf"]) < 0:
            continue
        x, y, w, h = (float(cells[k]) for k in ("left", "top", "width", "height"))
        boxes.append(TextBox(text, float(cells["conf"]) / 100, (x, y, x + w, y + h)))
    return boxes


class PaddleOCREngine:
    """PaddleOCR, the official engine (FlowGRPO: ``PaddleOCR(use_angle_cls=False, lang="en")``, paddleocr 2.9.1).

    Both APIs are handled: 2.x ``ocr(img, cls=False)`` and 3.x ``predict(img)``. Models are
    downloaded by PaddleOCR on first use.
    """

    name = "paddle"

    def __init__(self, device: str = "cpu", batch_size: int = 6, rgb_as_bgr: bool = False) -> None:
        self.version = _package_version("paddleocr", "`pip install -e '.[paddle]'` (FlowGRPO pins paddleocr==2.9.1)")
        self.major = int(self.version.split(".")[0])
        self.device, self.batch_size, self.rgb_as_bgr = device, batch_size, rgb_as_bgr
        self._ocr: Any = None

    def _load(self) -> Any:
        if self._ocr is None:
            paddleocr = importlib.import_module("paddleocr")
            if self.major < 3:
                self._ocr = paddleocr.PaddleOCR(
                    use_angle_cls=False,
                    lang="en",
                    use_gpu=self.device != "cpu",
                    rec_batch_num=self.batch_size,
                    show_log=False,
                )
            else:
                self._ocr = paddleocr.PaddleOCR(
                    lang="en",
                    device="gpu" if self.device == "cuda" else self.device,
                    use_doc_orientation_classify=False,
                    use_doc_unwarping=False,
                    use_textline_orientation=False,
                    text_recognition_batch_size=self.batch_size,
                )
        return self._ocr

    def read(self, images: Sequence[np.ndarray]) -> list[list[TextBox]]:
        ocr = self._load()
        out = []
        for image in images:
            bgr = image if self.rgb_as_bgr else np.ascontiguousarray(image[:, :, ::-1])
            if self.major < 3:
                out.append(parse_paddle2(ocr.ocr(bgr, cls=False)))
            else:
                out.append(parse_paddle3(ocr.predict(bgr)))
        return out


def parse_paddle2(result: Any) -> list[TextBox]:
    """PaddleOCR 2.x ``ocr()`` output ``[[[points, (text, conf)], ...]]`` (``[None]`` when nothing is found).

    Boxes with conf > 0 are kept, as in FlowGRPO.
    """
    lines = result[0] if result else None
    return [TextBox(str(text), float(conf), bounds(points)) for points, (text, conf) in lines or [] if conf > 0]


def parse_paddle3(result: Any) -> list[TextBox]:
    """PaddleOCR 3.x ``predict()`` output: one mapping with ``rec_texts``, ``rec_scores``, ``rec_polys``."""
    if len(result) != 1:
        raise RewardError(f"PaddleOCR predict() returned {len(result)} results for one image, expected 1")
    page = result[0]
    return [
        TextBox(str(text), float(conf), bounds(poly))
        for text, conf, poly in zip(page["rec_texts"], page["rec_scores"], page["rec_polys"], strict=True)
        if conf > 0
    ]


def make_engine(engine: EngineName, device: str = "cpu", batch_size: int = 6, rgb_as_bgr: bool = False) -> OCREngine:
    """Build an engine by name (models still load lazily, on the first ``read``)."""
    if engine == "rapidocr":
        return RapidOCREngine(device=device, batch_size=batch_size, rgb_as_bgr=rgb_as_bgr)
    if engine == "tesseract":
        if device != "cpu" or rgb_as_bgr:
            raise ValueError(f"tesseract runs on the CPU on RGB input; got device={device!r}, rgb_as_bgr={rgb_as_bgr}")
        return TesseractEngine()
    if engine == "paddle":
        return PaddleOCREngine(device=device, batch_size=batch_size, rgb_as_bgr=rgb_as_bgr)
    raise ValueError(f"unknown OCR engine {engine!r}; allowed: 'rapidocr', 'tesseract', 'paddle'")


@dataclass(frozen=True)
class OCRResult:
    """One scored image: what was asked, what was read, the reward, and which engine read it."""

    target: str
    recognized: str
    reward: float
    engine: str
    engine_version: str


class OCRReward:
    """OCR reward over a batch: images (B, 3, H, W) in [0, 1] → (B,) FlowGRPO OCR scores in [0, 1].

    The target is each prompt's first quoted span (``Prompt.text``). ``last_results`` keeps the
    per-image :class:`OCRResult` of the latest call. Any failure of the engine raises
    :class:`RewardError` (with the original exception chained).
    """

    def __init__(
        self,
        engine: EngineName | OCREngine = "rapidocr",
        device: str = "cpu",
        batch_size: int = 6,
        rgb_as_bgr: bool = False,
    ) -> None:
        try:
            importlib.import_module("Levenshtein")
        except ImportError:
            raise RewardError(
                "the OCR reward needs the `levenshtein` package (import name Levenshtein, as in FlowGRPO); "
                f"install it with {OCR_EXTRA_HINT}"
            ) from None
        if isinstance(engine, str):
            self.engine: OCREngine = make_engine(engine, device, batch_size, rgb_as_bgr)
        else:
            self.engine = engine
        self.spec = RewardSpec(
            name="ocr",
            version=f"1/{self.engine.name}-{self.engine.version}",
            description="FlowGRPO OCR reward: 1 - capped Levenshtein(read text, quoted target) / len(target)",
            higher_is_better=True,
            value_range=(0.0, 1.0),
            differentiable=False,
        )
        self.last_results: list[OCRResult] = []

    def __call__(self, images: Tensor, prompts: Sequence[Prompt]) -> Tensor:
        check_images(self.spec.name, images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        targets = [ocr_target(p.text) for p in prompts]  # fail before running the engine
        boxes = self._read(list(to_uint8(images)))
        if len(boxes) != len(prompts):
            raise RewardError(
                f"OCR engine {self.engine.name!r} returned {len(boxes)} results for {len(prompts)} images"
            )
        self.last_results = []
        for prompt, target, image_boxes in zip(prompts, targets, boxes, strict=True):
            text = recognized_text(image_boxes)
            self.last_results.append(
                OCRResult(target, text, ocr_reward(prompt.text, text), self.engine.name, self.engine.version)
            )
        return torch.tensor([r.reward for r in self.last_results], dtype=torch.float32)

    def _read(self, images: list[np.ndarray]) -> list[list[TextBox]]:
        try:
            return self.engine.read(images)
        except RewardError:
            raise
        except Exception as error:  # the third-party engine boundary: re-raised, typed, with the cause chained
            raise RewardError(
                f"OCR engine {self.engine.name!r} ({self.engine.version}) failed on {len(images)} image(s): "
                f"{type(error).__name__}: {error}"
            ) from error
