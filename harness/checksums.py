"""Weights folders carry the SHA-256 of their ``model.safetensors`` beside it; this checks it before loading.

In the core because the shapes benchmark's base checkpoint and the shapes classifier reward's asset both use it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


class ChecksumError(RuntimeError):
    """A checkpoint's weights do not match the sha256 recorded beside them."""


def verify_checksum(directory: Path) -> None:
    """Compare ``model.safetensors`` with ``model.safetensors.sha256`` when the latter exists."""
    recorded = directory / "model.safetensors.sha256"
    if not recorded.is_file():
        return
    expected = recorded.read_text().split()[0]
    actual = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    if actual != expected:
        raise ChecksumError(f"{directory}/model.safetensors has sha256 {actual}, but {recorded.name} says {expected}")
