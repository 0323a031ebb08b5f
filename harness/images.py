"""Image conversions shared by rewards and benchmarks, and image grids for reports and for looking at samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from harness.atomic import atomic_write


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] → (B, H, W, 3) uint8."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: Tensor, path: Path, columns: int = 8, scale: int = 4, pad: int = 2) -> Path:
    """Write (N, 3, H, W) images in [0, 1] as one PNG grid, each image upscaled ``scale``× (nearest)."""
    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(pixels):
        r, c = divmod(i, columns)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = image
    image = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.Resampling.NEAREST)
    return atomic_write(path, lambda f: image.save(f, format="PNG"))
