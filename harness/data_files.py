"""Public prompt files: where each comes from, its pinned SHA-256, and a verified local copy.

In the core because prompt sets (benchmarks) and the GenEval reward (GenEval's class names) both read them.

A file is read from ``data_dir/<key>`` when a data folder is given (laid out like
``../shared/data``), else from the cache (``$DIFFRL_CACHE`` or ``~/.cache/diffrl``, under
``prompt_sets/<key>``), downloading it from its public URL on first use. Pinned checksums are the
SHA-256s listed in ``shared/data/README.md``; a file without one (FlowGRPO's OCR train split,
not copied and checked yet) is accepted with a warning that logs its computed hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

FLOW_GRPO = "https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset"
GENEVAL = "https://raw.githubusercontent.com/djghosh13/geneval/main"


class PromptFileError(RuntimeError):
    """A prompt file is missing, cannot be downloaded, or does not match its pinned checksum."""


@dataclass(frozen=True)
class PromptFile:
    """One public prompt file: ``key`` is its path inside a data folder (and the cache)."""

    key: str
    url: str
    sha256: str | None  # None: not pinned (the file has not been copied and checked yet)


FILES: dict[str, PromptFile] = {
    f.key: f
    for f in (
        PromptFile(
            "geneval/evaluation_metadata.jsonl",
            f"{GENEVAL}/prompts/evaluation_metadata.jsonl",
            "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13",
        ),
        PromptFile(
            "geneval/object_names.txt",
            f"{GENEVAL}/evaluation/object_names.txt",
            "608f6a0e5c8ca1c7a92b818430141fe268c85b7930b50f4160f1d65893b5bacd",
        ),
        PromptFile(
            "flow_grpo/geneval_test_metadata.jsonl",
            f"{FLOW_GRPO}/geneval/test_metadata.jsonl",
            "cec4b24b9fee7bac21c8f787054ecc8dc9ff831674037713a4cd35e0f0a74a28",
        ),
        PromptFile(
            "flow_grpo/ocr_test.txt",
            f"{FLOW_GRPO}/ocr/test.txt",
            "4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc",
        ),
        PromptFile("flow_grpo/ocr_train.txt", f"{FLOW_GRPO}/ocr/train.txt", None),
        PromptFile(
            "flow_grpo/pickscore_test.txt",
            f"{FLOW_GRPO}/pickscore/test.txt",
            "d75c025fa451866e70f7e36243f7cdd93095523cb51f5f9651f2ce3236d20262",
        ),
        PromptFile(
            "flow_grpo/pickscore_train.txt",
            f"{FLOW_GRPO}/pickscore/train.txt",
            "2f425adcbb9a6d0feee7c6c448e1cb83a1f71deca9434b803907e2578eca837f",
        ),
        PromptFile(
            "drawbench/test.txt",
            "https://raw.githubusercontent.com/NVlabs/DiffusionNFT/main/dataset/drawbench/test.txt",
            "9006b98feabb94b28a2bc0c88de42fd4f31a9ec3c2a19e308a02c5385b7172f0",
        ),
    )
}


def cache_dir() -> Path:
    """``$DIFFRL_CACHE`` if set, else ``~/.cache/diffrl``."""
    return Path(os.environ.get("DIFFRL_CACHE") or Path.home() / ".cache" / "diffrl")


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(file: PromptFile, path: Path) -> str:
    """Check ``path`` against the file's pinned SHA-256; return the computed hash."""
    actual = sha256_of(path)
    if file.sha256 is None:
        logger.warning("%s has no pinned SHA-256; using %s with sha256=%s", file.key, path, actual)
    elif actual != file.sha256:
        raise PromptFileError(
            f"{path} does not match the pinned SHA-256 of {file.key}: expected {file.sha256}, got {actual}. "
            f"Delete it (a cached copy is re-downloaded from {file.url}) or pass the right file."
        )
    return actual


def download(file: PromptFile, target: Path, timeout: float = 60.0) -> None:
    """Fetch ``file.url`` into ``target`` (via a temporary file, verified before it is moved into place).

    The temporary file has a unique name next to ``target``, so concurrent downloads (several runs
    starting at once) never write into each other's file; the last verified one wins the rename.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(handle)
    partial = Path(name)
    try:
        with urllib.request.urlopen(file.url, timeout=timeout) as response:
            partial.write_bytes(response.read())
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise PromptFileError(
            f"could not download {file.key} from {file.url} ({error}). If this machine is offline, download "
            f"the file elsewhere and pass data_dir=<folder> holding it as <folder>/{file.key}, "
            f"or put it at {target}."
        ) from error
    try:
        verify(file, partial)
    except PromptFileError:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)


def fetch(file: PromptFile | str, data_dir: str | Path | None = None) -> tuple[Path, str]:
    """A verified local copy of ``file`` and its SHA-256: from ``data_dir`` if given, else the cache."""
    file = FILES[file] if isinstance(file, str) else file
    if data_dir is not None:
        path = Path(data_dir) / file.key
        if not path.is_file():
            raise PromptFileError(
                f"{path} not found: data_dir={str(data_dir)!r} should hold {file.key} (public source: {file.url})"
            )
        return path, verify(file, path)
    path = cache_dir() / "prompt_sets" / file.key
    if not path.is_file():
        logger.info("downloading %s from %s to %s", file.key, file.url, path)
        download(file, path)
    return path, verify(file, path)


def read_lines(file: PromptFile | str, data_dir: str | Path | None = None) -> tuple[list[str], str]:
    """The file's lines, stripped of surrounding whitespace as FlowGRPO's ``line.strip()``, and its SHA-256.

    Empty lines are dropped (FlowGRPO would keep them as empty prompts). The checksum is of the
    file's bytes, so stripping does not affect verification.
    """
    path, digest = fetch(file, data_dir)
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line], digest
