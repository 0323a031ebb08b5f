"""The results store of a suite: one tidy table (CSV and parquet) and the run's provenance.

``results.csv`` / ``results.parquet``: one row per evaluation with ``suite``, ``method``,
``variant``, ``seed``, ``iteration``, the eval point, every compute unit (``compute/*``), every
metric (``eval/*``, per task too) and wall time (``time/elapsed``). ``metadata.json``: git commit,
config hash, package versions (the main ones, and every installed distribution with the lock file's
sha256: :func:`environment`), device and timings.
"""

from __future__ import annotations

import hashlib
import io
import platform
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from harness.atomic import atomic_write

PACKAGES = ("diffrl", "torch", "numpy", "pandas", "diffusers", "transformers", "peft", "accelerate")
LOCK_FILE = Path(__file__).resolve().parent.parent / "requirements" / "lock.txt"  # the Makefile's LOCK
ID_COLUMNS = ("suite", "method", "variant", "seed", "iteration", "optimizer_steps", "eval_point", "budget/fraction")


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows → a table with the identifying columns first, then compute, metrics and time."""
    df = pd.DataFrame(rows)
    first = [c for c in ID_COLUMNS if c in df.columns]
    compute = sorted(c for c in df.columns if c.startswith("compute/"))
    metrics = [c for c in df.columns if c.startswith("eval/")]
    rest = [c for c in df.columns if c not in {*first, *compute, *metrics}]
    return df[first + compute + metrics + rest]


def write_results(df: pd.DataFrame, out: Path) -> list[Path]:
    """Write ``results.csv`` and ``results.parquet`` atomically."""
    csv = atomic_write(out / "results.csv", lambda f: f.write(df.to_csv(index=False).encode()))

    def parquet(f: Any) -> None:
        buffer = io.BytesIO()
        df.to_parquet(buffer, index=False)
        f.write(buffer.getvalue())

    return [csv, atomic_write(out / "results.parquet", parquet)]


def read_results(path: Path) -> pd.DataFrame:
    """A results table from a ``.csv`` or ``.parquet`` file, or a suite folder holding one."""
    if path.is_dir():
        path = path / "results.parquet" if (path / "results.parquet").is_file() else path / "results.csv"
    if not path.is_file():
        raise FileNotFoundError(f"results table {path} not found (written by 'diffrl run')")
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def git_commit(repo: Path | None = None) -> dict[str, Any]:
    """The checkout's commit and whether it has uncommitted changes (None outside a git checkout)."""
    cwd = repo or Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def installed_distributions() -> list[str]:
    """Every distribution this interpreter can import from, as sorted ``name==version`` lines (first on the path wins)."""
    found: dict[str, str] = {}
    for dist in importlib_metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() not in found:
            found[name.lower()] = f"{name}=={dist.version}"
    return sorted(found.values(), key=str.lower)


def lock_info(path: Path = LOCK_FILE) -> dict[str, str | None]:
    """The lock file the Makefile installs from: its path and sha256 (None where the checkout has none)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return {"file": str(path), "sha256": digest}


def environment() -> dict[str, Any]:
    """The full installed set and the lock it was meant to follow (``metadata.json``'s ``environment``)."""
    return {"installed": installed_distributions(), "lock": lock_info()}


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
