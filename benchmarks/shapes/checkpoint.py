"""The committed base checkpoint of the shapes world and its loader (checksum-verified)."""

from __future__ import annotations

from pathlib import Path

from harness.checksums import verify_checksum
from harness.policies.tiny_dit import TinyDiTPolicy, load_tiny_dit

BASE_CHECKPOINT = Path(__file__).parent / "assets" / "base"


def load_shapes_policy(directory: Path | None = None) -> TinyDiTPolicy:
    """The tiny-DiT policy from a checkpoint folder (default: the committed base)."""
    directory = Path(directory) if directory is not None else BASE_CHECKPOINT
    if not directory.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {directory} does not exist; pass a folder written by 'diffrl pretrain shapes'"
        )
    verify_checksum(directory)
    return TinyDiTPolicy(load_tiny_dit(directory))
