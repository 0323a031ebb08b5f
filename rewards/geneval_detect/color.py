"""GenEval's colour classifier: zero-shot CLIP ViT-L/14 over 10 colours (djghosh13/geneval, ``evaluate_images.py``).

For an object of class ``classname`` the official code:

1. composites the image over a flat ``#999`` grey with the instance's binary mask, crops it to the
   detection box (``ImageCrops``: ``Image.composite`` then ``Image.crop(box)``);
2. builds one text embedding per colour with clip_benchmark's ``zero_shot_classifier``: the three
   templates below, each embedding L2-normalised, averaged, re-normalised;
3. predicts ``argmax(100 · normalize(image embedding) @ classifier)`` over the 10 colours.

The official model is open_clip ``ViT-L-14`` with ``pretrained="openai"`` (:class:`OpenClipEncoder`);
the same weights are ``openai/clip-vit-large-patch14`` on the hub, used through transformers by
:class:`HFClipEncoder` (the default). Its processor (short side 224 bicubic, centre crop 224, OpenAI
mean/std) is open_clip's val transform.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from harness.geneval_rules import GENEVAL_COLORS
from harness.types import RewardError
from rewards.geneval_detect.base import Box, Instance, check_image

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
ClipBackend = Literal["hf", "open_clip"]
COLOR_TEMPLATES = ("a photo of a {c} {classname}", "a photo of a {c}-colored {classname}", "a photo of a {c} object")
BACKGROUND = (153, 153, 153)  # "#999", GenEval's default bgcolor


def composite_and_crop(
    image: np.ndarray,
    box: Box,
    mask: np.ndarray | None,
    background: tuple[int, int, int] = BACKGROUND,
    crop: bool = True,
) -> Image.Image:
    """The object's crop as GenEval feeds it to CLIP: pixels outside ``mask`` become ``background``, then the box.

    ``image`` is RGB uint8 (H, W, 3), ``mask`` bool (H, W) or ``None`` (no compositing). The crop is
    PIL's ``Image.crop(box)``, which rounds the coordinates to whole pixels, as in the official code.
    """
    check_image(image, "colour crop")
    if mask is not None:
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
        image = np.where(mask.astype(bool)[..., None], image, np.asarray(background, dtype=np.uint8))
    pil = Image.fromarray(np.ascontiguousarray(image))
    if not crop:
        return pil
    cropped = pil.crop((float(box[0]), float(box[1]), float(box[2]), float(box[3])))
    if cropped.width < 1 or cropped.height < 1:
        raise RewardError(f"detection box {box} gives an empty crop of an image of size {pil.size}")
    return cropped


def color_texts(
    classname: str, colors: Sequence[str] = GENEVAL_COLORS, templates: Sequence[str] = COLOR_TEMPLATES
) -> list[str]:
    """The prompts for one class, colour-major: for each colour, each template."""
    return [template.format(c=color, classname=classname) for color in colors for template in templates]


def color_weights(text_features: Tensor, num_colors: int) -> Tensor:
    """clip_benchmark's ``zero_shot_classifier``: (num_colors × T, D) colour-major text embeddings → (D, num_colors).

    Each embedding is L2-normalised, the T templates of a colour are averaged, and the mean is re-normalised.
    """
    if text_features.ndim != 2 or text_features.shape[0] % num_colors:
        raise ValueError(f"expected ({num_colors} x templates, D) text features, got {tuple(text_features.shape)}")
    per_color = F.normalize(text_features.float(), dim=-1).reshape(num_colors, -1, text_features.shape[1]).mean(1)
    return F.normalize(per_color, dim=-1).T


def predict_colors(image_features: Tensor, weights: Tensor) -> Tensor:
    """clip_benchmark's ``run_classification``: argmax of ``100 · normalize(image) @ weights`` → (N,) indices."""
    logits = 100.0 * F.normalize(image_features.float(), dim=-1) @ weights.float().to(image_features.device)
    return logits.argmax(dim=1)


class ClipEncoder(Protocol):
    """A CLIP model: texts → (N, D) and PIL images → (N, D) embeddings (not normalised)."""

    name: str

    def encode_text(self, texts: Sequence[str]) -> Tensor: ...

    def encode_images(self, images: Sequence[Image.Image]) -> Tensor: ...


class ColorClassifier(Protocol):
    """Names the colour of each instance of ``classname`` in an RGB uint8 image (H, W, 3)."""

    name: str

    def classify(self, image: np.ndarray, instances: Sequence[Instance], classname: str) -> list[str]: ...


def _autocast(device: str) -> Any:
    """fp16 autocast on CUDA (the CLIP colour models' inference precision); nothing elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def _features(output: Any) -> Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` holds the projection; 4.x a tensor."""
    return output if isinstance(output, Tensor) else output.pooler_output


class HFClipEncoder:
    """CLIP through transformers (``CLIPModel`` + its processor), loaded on first use.

    On CUDA the forward passes run under fp16 autocast, as the official code (``torch.cuda.amp.autocast``).
    """

    name = "hf-clip"

    def __init__(self, model_path: str | Path = DEFAULT_CLIP, device: str = "cpu", batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_path, self.device, self.batch_size = str(model_path), device, batch_size
        self.name = f"hf-clip:{self.model_path}"
        self._model: Any = None
        self._processor: Any = None

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            from transformers import AutoProcessor, CLIPModel

            self._processor = AutoProcessor.from_pretrained(self.model_path)
            model: Any = CLIPModel.from_pretrained(self.model_path)
            self._model = model.to(self.device).eval()
        return self._model, self._processor

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        model, processor = self._load()
        tokens = processor.tokenizer(list(texts), padding=True, return_tensors="pt").to(self.device)
        with _autocast(self.device):
            out = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return _features(out).float()

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> Tensor:
        model, processor = self._load()
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = processor.image_processor(
                images=list(images[start : start + self.batch_size]), return_tensors="pt"
            )
            with _autocast(self.device):
                out = model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
            chunks.append(_features(out).float())
        return torch.cat(chunks)


class OpenClipEncoder:
    """CLIP through open_clip, the official loader (``create_model_and_transforms`` + its val transform).

    ``model_name``: an open_clip architecture (``ViT-L-14``) or ``local-dir:<folder>`` holding
    ``open_clip_config.json`` and weights; ``pretrained``: a tag (``openai``, fetched by open_clip) or a
    checkpoint file (ignored for ``local-dir:``). OpenAI's weights were trained with QuickGELU; open_clip
    2.20 (the official env) loaded them with it, while open_clip 3.x builds plain ``ViT-L-14`` with GELU
    and only warns, so ``quick_gelu`` defaults to on for ``pretrained="openai"``.
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        pretrained: str | Path | None = "openai",
        device: str = "cpu",
        batch_size: int = 16,
        quick_gelu: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name, self.device, self.batch_size = model_name, device, batch_size
        self.pretrained = None if pretrained is None else str(pretrained)
        self.quick_gelu = self.pretrained == "openai" if quick_gelu is None else quick_gelu
        self.name = f"open_clip:{model_name}:{self.pretrained}"
        self._model: Any = None
        self._preprocess: Any = None
        self._tokenizer: Any = None

    @classmethod
    def from_path(cls, path: str | Path | None, device: str = "cpu", batch_size: int = 16) -> OpenClipEncoder:
        """``None``: ViT-L-14 with OpenAI's weights; a folder: ``local-dir:``; a file: ViT-L-14 weights."""
        if path is None:
            return cls(device=device, batch_size=batch_size)
        if Path(path).is_dir():
            return cls(f"local-dir:{path}", None, device=device, batch_size=batch_size)
        if Path(path).is_file():
            return cls("ViT-L-14", path, device=device, batch_size=batch_size, quick_gelu=True)
        raise RewardError(f"open_clip colour model {path} is neither a folder nor a checkpoint file")

    def _load(self) -> tuple[Any, Any, Any]:
        if self._model is None:
            import open_clip

            model, _, preprocess = open_clip.create_model_and_transforms(
                self.model_name, pretrained=self.pretrained, device=self.device, force_quick_gelu=self.quick_gelu
            )
            self._model, self._preprocess = model.eval(), preprocess
            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        return self._model, self._preprocess, self._tokenizer

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        model, _, tokenizer = self._load()
        with _autocast(self.device):
            return model.encode_text(tokenizer(list(texts)).to(self.device)).float()

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> Tensor:
        model, preprocess, _ = self._load()
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([preprocess(image) for image in images[start : start + self.batch_size]])
            with _autocast(self.device):
                chunks.append(model.encode_image(pixels.to(self.device)).float())
        return torch.cat(chunks)


def make_color_classifier(
    clip_backend: ClipBackend = "hf", clip_path: str | Path | None = None, device: str = "cpu", batch_size: int = 16
) -> ClipColorClassifier:
    """GenEval's colour classifier on CLIP ViT-L/14 (models load on first use).

    ``hf``: ``clip_path`` = hub id or folder (default ``openai/clip-vit-large-patch14``); ``open_clip``:
    see :meth:`OpenClipEncoder.from_path`. The official code runs CLIP in batches of 16.
    """
    if clip_backend == "hf":
        return ClipColorClassifier(HFClipEncoder(clip_path or DEFAULT_CLIP, device, batch_size))
    if clip_backend == "open_clip":
        return ClipColorClassifier(OpenClipEncoder.from_path(clip_path, device, batch_size))
    raise ValueError(f"unknown CLIP backend {clip_backend!r}; allowed: 'hf', 'open_clip'")


class ClipColorClassifier:
    """GenEval's zero-shot colour classifier over a :class:`ClipEncoder` (see the module docstring).

    The per-class colour classifier (D, 10) is computed once per class name and cached.
    """

    def __init__(
        self,
        encoder: ClipEncoder,
        colors: Sequence[str] = GENEVAL_COLORS,
        templates: Sequence[str] = COLOR_TEMPLATES,
        background: tuple[int, int, int] = BACKGROUND,
        crop: bool = True,
    ) -> None:
        self.encoder, self.colors, self.templates = encoder, tuple(colors), tuple(templates)
        self.background, self.crop = background, crop
        self.name = encoder.name
        self._weights: dict[str, Tensor] = {}

    def weights(self, classname: str) -> Tensor:
        """The (D, num_colors) classifier of one object class."""
        if classname not in self._weights:
            texts = color_texts(classname, self.colors, self.templates)
            self._weights[classname] = color_weights(self.encoder.encode_text(texts), len(self.colors))
        return self._weights[classname]

    def classify(self, image: np.ndarray, instances: Sequence[Instance], classname: str) -> list[str]:
        """The colour name of each instance, from its masked crop."""
        if not instances:
            return []
        crops = [composite_and_crop(image, inst.box, inst.mask, self.background, self.crop) for inst in instances]
        features = self.encoder.encode_images(crops)
        if features.shape[0] != len(instances):
            raise RewardError(f"CLIP encoder returned {features.shape[0]} embeddings for {len(instances)} crops")
        return [self.colors[i] for i in predict_colors(features, self.weights(classname)).tolist()]
