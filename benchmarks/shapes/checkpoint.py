"""The committed base checkpoint of the shapes world and its loader (checksum-verified)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from harness.policies.tiny_dit import TinyDiTPolicy, load_tiny_dit

BASE_CHECKPOINT = Path(__file__).parent / "assets" / "base"


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


def load_shapes_policy(directory: Path | None = None) -> TinyDiTPolicy:
    """The tiny-DiT policy from a checkpoint folder (default: the committed base)."""
    directory = Path(directory) if directory is not None else BASE_CHECKPOINT
    if not directory.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {directory} does not exist; pass a folder written by 'diffrl pretrain shapes'"
        )
    verify_checksum(directory)
    return TinyDiTPolicy(load_tiny_dit(directory))
