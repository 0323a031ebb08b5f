"""Image conversions shared by rewards and benchmarks, and image grids for reports and for looking at samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from harness.atomic import atomic_write

GRID_MAX_SIDE = 1024  # a grid is upscaled (nearest, by a whole factor) only while its longer side stays within this


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] → (B, H, W, 3) uint8."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid_scale(height: int, width: int, max_side: int = GRID_MAX_SIDE) -> int:
    """The whole upscaling factor of a ``height`` × ``width`` grid: as large as keeps both sides ≤ ``max_side``,
    and 1 for a grid that is already larger (a grid is never shrunk)."""
    return max(1, max_side // max(height, width, 1))


def grid_array(images: Tensor, columns: int = 8, pad: int = 2, scale: int | None = None) -> np.ndarray:
    """(N, 3, H, W) images in [0, 1] → one (rows, columns) grid as an (H', W', 3) uint8 array, white padding.

    ``scale``: nearest-neighbour upscaling factor; None picks :func:`grid_scale`'s, so 32 px shapes images
    are enlarged to be seen while a grid of 512 px SD3 images keeps its native size.
    """
    if columns < 1 or pad < 0 or (scale is not None and scale < 1):
        raise ValueError(f"need columns >= 1, pad >= 0 and scale >= 1 (or None), got {columns}, {pad}, {scale}")
    pixels = to_uint8(images)
    n, h, w, _ = pixels.shape
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(pixels):
        r, c = divmod(i, columns)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = image
    factor = grid_scale(*canvas.shape[:2]) if scale is None else scale
    return canvas if factor == 1 else canvas.repeat(factor, axis=0).repeat(factor, axis=1)


def save_grid(images: Tensor, path: Path, columns: int = 8, scale: int | None = None, pad: int = 2) -> Path:
    """Write (N, 3, H, W) images in [0, 1] as one PNG grid (see :func:`grid_array` for ``scale``)."""
    image = Image.fromarray(grid_array(images, columns, pad, scale))
    return atomic_write(path, lambda f: image.save(f, format="PNG"))
