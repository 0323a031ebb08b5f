"""A prompt-blind random reward: the control that tells learning from drift.

A method that gains as much under this reward as under a real one is not learning from the reward: its
gains (or its clutter) come from training on its own samples. Each image scores 1 with probability
``p`` and 0 otherwise, decided by a hash of its bytes, so the reward needs no generator state: it is
deterministic, the same on every process, and resumes exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from harness.types import Prompt, RewardSpec, check_images


class RandomControl:
    """Bernoulli(``p``) per image, independent of the prompt, from a hash of the image's bytes."""

    def __init__(self, p: float = 0.2) -> None:
        if not 0.0 < p < 1.0:
            raise ValueError(f"p must be in (0, 1), got {p!r}")
        self.p = p
        self.spec = RewardSpec(
            name="random_control",
            version=f"1/p={p}",
            description="prompt-blind Bernoulli(p) from a hash of the image (a control, not a quality score)",
            value_range=(0.0, 1.0),
        )

    def __call__(self, images: Tensor, prompts: Sequence[Prompt]) -> Tensor:
        check_images(self.spec.name, images)
        pixels = images.detach().float().cpu().contiguous()
        uniforms = [_uniform(image.numpy().tobytes()) for image in pixels]
        return torch.tensor([float(u < self.p) for u in uniforms], dtype=torch.float32)


def _uniform(data: bytes) -> float:
    """A number in [0, 1) determined by ``data`` (the first 8 bytes of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2.0**64
