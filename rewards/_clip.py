"""Shared pieces of the learned scorers (PickScore, HPSv2, CLIP score, Aesthetic, ImageReward).

* Differentiable preprocessing on (B, 3, H, W) tensors in [0, 1]: resize (bicubic, antialiased), centre
  crop or pad, mean/std normalisation, all torch ops, so a gradient reaches the pixels. The official
  scorers run PIL on uint8 images (CLIPProcessor, open_clip's ``preprocess_val``, ImageReward's
  ``_transform``); DiffusionNFT already swapped in torchvision tensor transforms for CLIP score and
  HPSv2. Tensor bicubic resizing differs from PIL's by a few 1e-3 per pixel; that is the one deviation.
* Checkpoint references: a local path, or a Hugging Face hub id (a repo for ``from_pretrained``, or
  ``owner/repo/file`` for a single file). Nothing is downloaded when ``HF_HUB_OFFLINE=1``; a missing
  path or an uncached id raises :class:`RewardError` saying how to pass a local path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.types import Prompt, RewardError, RewardSpec, check_images

T = TypeVar("T")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --- inputs ---------------------------------------------------------------------------------------


def check_batch(name: str, images: Tensor, prompts: Sequence[Prompt]) -> None:
    """:func:`~harness.types.check_images` (a :class:`RewardError` for a batch that cannot be scored: wrong shape
    or dtype, non-finite or out-of-range pixels), then ``ValueError`` unless there is one prompt per image."""
    check_images(name, images)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"reward {name!r}: {images.shape[0]} images but {len(prompts)} prompts")


def resolve_dtype(dtype: str) -> torch.dtype:
    """``"float32"`` / ``"float16"`` / ``"bfloat16"`` → the torch dtype (``ValueError`` otherwise)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def check_batch_size(batch_size: int) -> int:
    """A positive batch size, or ``ValueError``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return batch_size


def chunks(n: int, size: int) -> list[slice]:
    """Slices covering ``range(n)`` in pieces of at most ``size``."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


# --- differentiable preprocessing -----------------------------------------------------------------


def resize(images: Tensor, height: int, width: int) -> Tensor:
    """Bicubic, antialiased resize to (height, width), clamped to [0, 1] as PIL's uint8 output is."""
    if images.shape[-2:] == (height, width):
        return images
    out = F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0.0, 1.0)


def resize_shortest_edge(images: Tensor, size: int) -> Tensor:
    """Shorter side → ``size``, keeping the aspect (torchvision ``Resize(size)``, CLIP's ``shortest_edge``)."""
    height, width = images.shape[-2:]
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if height <= width else (new_long, size)
    return resize(images, new_h, new_w)


def center_crop(images: Tensor, height: int, width: int) -> Tensor:
    """Centre crop (torchvision ``CenterCrop``: top = round((H − h) / 2)); the image must be large enough."""
    full_h, full_w = images.shape[-2:]
    if full_h < height or full_w < width:
        raise ValueError(f"cannot centre-crop {(full_h, full_w)} to {(height, width)}")
    top, left = int(round((full_h - height) / 2.0)), int(round((full_w - width) / 2.0))
    return images[..., top : top + height, left : left + width]


def resize_longest_and_pad(images: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """Longer side → ``size`` (sides rounded), then pad to ``size``² centred with ``fill`` (HPSv2 ``ResizeMaxSize``).

    As in hpsv2's transform, nothing happens when the longer side already equals ``size``.
    """
    height, width = images.shape[-2:]
    scale = size / float(max(height, width))
    if scale == 1.0:
        return images
    new_h, new_w = round(height * scale), round(width * scale)
    out = resize(images, new_h, new_w)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(out, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x − mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


@dataclass(frozen=True)
class CropTransform:
    """Resize the shorter side, centre-crop, normalise: CLIP's (and BLIP's) eval transform on tensors."""

    size: int
    crop: tuple[int, int]
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    def __call__(self, images: Tensor) -> Tensor:
        images = center_crop(resize_shortest_edge(images.float(), self.size), *self.crop)
        return normalize(images, self.mean, self.std)

    @classmethod
    def from_image_processor(cls, processor: Any) -> CropTransform:
        """Read size, crop, mean and std from a transformers ``CLIPImageProcessor`` (its eval transform)."""
        size, crop = processor.size, processor.crop_size  # a dict (4.x) or a SizeDict (5.x): use .get
        if not getattr(processor, "do_resize", True) or size.get("shortest_edge") is None:
            raise RewardError(f"image processor must resize the shortest edge (size={dict(size)})")
        if not getattr(processor, "do_center_crop", True):
            raise RewardError("image processor must centre-crop (do_center_crop=False is not supported)")
        return cls(
            size=int(size.get("shortest_edge")),
            crop=(int(crop.get("height")), int(crop.get("width"))),
            mean=tuple(float(v) for v in processor.image_mean),
            std=tuple(float(v) for v in processor.image_std),
        )


# --- checkpoints ----------------------------------------------------------------------------------


def looks_like_path(ref: str) -> bool:
    """True for references that can only be file-system paths (absolute, ``./``, ``../``, ``~``)."""
    return ref.startswith(("/", "./", "../", "~"))


def _offline_hint() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    return " (HF_HUB_OFFLINE=1: nothing is downloaded)" if offline else ""


def load_pretrained(loader: Callable[[str], T], ref: str, field: str) -> T:
    """``loader(ref)`` for a transformers ``from_pretrained``: a local directory or a hub id.

    Raises :class:`RewardError` naming ``field`` when the path does not exist, or when the id is
    neither cached nor downloadable, with the fix: pass a local directory.
    """
    path = Path(ref).expanduser()
    if looks_like_path(ref) and not path.exists():
        raise RewardError(f"{field}={ref!r}: no such directory; pass an existing local directory or a hub id")
    if path.exists():
        try:
            return loader(str(path))
        except (OSError, ValueError) as error:  # missing files, or a config transformers cannot read
            raise RewardError(f"{field}={ref!r} is a local path but could not be loaded from it: {error}") from error
    try:
        return loader(ref)
    except (OSError, ValueError) as error:  # not found, offline, or not a valid hub id
        raise RewardError(
            f"{field}={ref!r} could not be loaded{_offline_hint()}: it is not a local directory and not in the "
            f"Hugging Face cache. Download it where there is network (`hf download {ref}`) and pass the local "
            f"directory as {field}='/path/to/dir'. Cause: {error}"
        ) from error


def resolve_file(ref: str, field: str) -> Path:
    """A single checkpoint file: an existing local path, or ``owner/repo/filename`` on the hub (cached first).

    Raises :class:`RewardError` naming ``field`` when the file is neither local nor obtainable.
    """
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    parts = ref.split("/")
    if looks_like_path(ref) or path.exists() or len(parts) < 3:
        raise RewardError(f"{field}={ref!r}: no such file; pass the path of the checkpoint file")
    from huggingface_hub import hf_hub_download

    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except (OSError, ValueError) as error:  # huggingface_hub: not found / offline (OSError), bad id (ValueError)
        raise RewardError(
            f"{field}={ref!r} is not a local file, and {filename!r} of hub repo {repo_id!r} could not be "
            f"fetched{_offline_hint()}. Download it where there is network (`hf download {repo_id} {filename}`) "
            f"and pass the file as {field}='/path/to/{Path(filename).name}'. Cause: {error}"
        ) from error


def pooled(output: Any) -> Tensor:
    """``get_image_features`` / ``get_text_features`` output → the projected embedding.

    transformers 5.x returns a ``BaseModelOutputWithPooling`` (projection in ``pooler_output``); 4.x a tensor.
    """
    return output if isinstance(output, Tensor) else output.pooler_output


def grad_context(images: Tensor) -> torch.autograd.grad_mode.set_grad_enabled:
    """Track gradients only when the caller asked for them (grad mode on and images requiring grad)."""
    return torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad)


# --- a transformers CLIP (PickScore, CLIP score, Aesthetic's backbone) -----------------------------


@dataclass
class HFClip:
    """A frozen transformers ``CLIPModel`` with its tokenizer and the tensor version of its image transform."""

    model: Any
    tokenizer: Any
    transform: CropTransform
    device: torch.device
    dtype: torch.dtype

    @property
    def logit_scale(self) -> Tensor:
        """``exp(logit_scale)``, the learned temperature (100 for OpenAI CLIP and PickScore)."""
        return self.model.logit_scale.exp().float()

    def image_embeds(self, images: Tensor) -> Tensor:
        """L2-normalised projected image embeddings (B, D), float32; differentiable in ``images``."""
        pixels = self.transform(images.to(self.device)).to(self.dtype)
        embeds = pooled(self.model.get_image_features(pixel_values=pixels)).float()
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def text_embeds(self, texts: Sequence[str], padding: bool | str) -> Tensor:
        """L2-normalised projected text embeddings (B, D), float32; truncated at 77 tokens."""
        tokens = self.tokenizer(list(texts), padding=padding, truncation=True, max_length=77, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        embeds = pooled(self.model.get_text_features(**tokens)).float()
        return embeds / embeds.norm(dim=-1, keepdim=True)


def load_hf_clip(
    model_ref: str, processor_ref: str, device: str, dtype: torch.dtype, fields: tuple[str, str]
) -> HFClip:
    """``AutoProcessor.from_pretrained(processor_ref)`` + ``AutoModel.from_pretrained(model_ref)``, frozen, in eval.

    ``fields`` names the two options (model, processor) in error messages.
    """
    from transformers import AutoModel, AutoProcessor

    model = load_pretrained(lambda ref: AutoModel.from_pretrained(ref, dtype=dtype), model_ref, fields[0])
    processor = load_pretrained(AutoProcessor.from_pretrained, processor_ref, fields[1])
    if not hasattr(model, "get_image_features") or not hasattr(model, "logit_scale"):
        raise RewardError(f"{fields[0]}={model_ref!r} loaded a {type(model).__name__}, expected a CLIPModel")
    for part in ("tokenizer", "image_processor"):
        if getattr(processor, part, None) is None:
            raise RewardError(f"{fields[1]}={processor_ref!r} has no {part}; expected a CLIPProcessor")
    model = model.eval().requires_grad_(False).to(device)
    transform = CropTransform.from_image_processor(processor.image_processor)
    return HFClip(model, processor.tokenizer, transform, torch.device(device), dtype)


class PairedClipScore:
    """``exp(logit_scale) · cos(img_i, txt_i) / divisor`` per image-prompt pair with a transformers CLIP.

    The shared body of :class:`~rewards.pickscore.PickScore` and :class:`~rewards.clipscore.CLIPScore`;
    a subclass sets ``divisor`` and the tokenizer's ``text_padding`` and builds its spec.
    """

    divisor: float
    text_padding: bool | str

    def __init__(self, model: str, processor: str, device: str, dtype: str, batch_size: int, spec: RewardSpec) -> None:
        self.model_ref, self.processor_ref, self.device = model, processor, device
        self.dtype, self.batch_size = resolve_dtype(dtype), check_batch_size(batch_size)
        self.spec = spec
        self._clip: HFClip | None = None

    def load(self) -> HFClip:
        """Load the processor and model (once); the only place weights are touched."""
        if self._clip is None:
            self._clip = load_hf_clip(
                self.model_ref, self.processor_ref, self.device, self.dtype, ("model", "processor")
            )
        return self._clip

    def __call__(self, images: Tensor, prompts: Sequence[Prompt]) -> Tensor:
        check_batch(self.spec.name, images, prompts)
        clip = self.load()
        out = []
        with grad_context(images):
            for part in chunks(images.shape[0], self.batch_size):
                img = clip.image_embeds(images[part])
                txt = clip.text_embeds([p.text for p in prompts[part]], padding=self.text_padding)
                out.append(clip.logit_scale * (img * txt).sum(dim=-1) / self.divisor)
        return torch.cat(out).float().cpu()


class PreferenceMLP(torch.nn.Module):
    """The 5-layer linear head shared by the LAION aesthetic predictor and ImageReward.

    ``Linear(d,1024) → Dropout(.2) → Linear(1024,128) → Dropout(.2) → Linear(128,64) → Dropout(.1) →
    Linear(64,16) → Linear(16,1)``, no activations (both originals comment theirs out); the
    ``layers.{0,2,4,6,7}`` keys match both official state dicts.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(embed_dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        """(B, embed_dim) → (B,)."""
        return self.layers(features).squeeze(-1)
