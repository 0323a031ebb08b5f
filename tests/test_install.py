"""The install: declared dependencies, the lock, pip check, and the resolution for Python 3.12 and 3.13.

The resolution check is the command docs/install.md gives, run for the newer interpreters without
having them: pip resolves the locked install for another Python from the index's wheels alone.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from harness.store import environment

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
FIRST_PARTY = {"methods", "rewards", "benchmarks", "harness", "tests"}
LOCKED_EXTRAS = ("test", "ocr", "mmdet")  # the Makefile's `make lock` resolves these (paddle is not locked)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, list[Requirement]]:
    """pyproject.toml's requirements: ``""`` for the dependencies, then one entry per extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"": project["dependencies"], **project["optional-dependencies"]}
    return {group: [Requirement(line) for line in lines] for group, lines in groups.items()}


def locked() -> dict[str, list[Requirement]]:
    """The lock's pins by canonical name (a package may have one pin per marker, e.g. per Python version)."""
    pins: dict[str, list[Requirement]] = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            requirement = Requirement(line)
            pins.setdefault(canonical(requirement.name), []).append(requirement)
    return pins


def imported_modules(directory: Path) -> dict[str, str]:
    """Top-level modules imported by the files under ``directory`` (absolute imports), with one file that does."""
    found: dict[str, str] = {}
    for path in sorted(directory.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return {m: f for m, f in found.items() if m not in sys.stdlib_module_names and m not in FIRST_PARTY}


def test_every_imported_package_is_declared():
    """Each third-party module imported by the code or the tests comes from a declared distribution (the
    dependencies or an extra: optional engines are imported lazily); ones not installed here count by name."""
    distributions = importlib.metadata.packages_distributions()
    groups = declared()
    names = {canonical(r.name) for group in groups.values() for r in group}
    missing = []
    for directory in ("methods", "rewards", "benchmarks", "harness", "tests"):
        for module, path in imported_modules(ROOT / directory).items():
            providers = {canonical(n) for n in distributions.get(module, [module])}
            if not providers & names:
                missing.append(f"{module} ({path}; from {sorted(providers)})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    runtime = {canonical(r.name) for r in groups[""]}
    assert {"matplotlib", "huggingface-hub", "open-clip-torch", "diffusers"} <= runtime


def test_the_lock_pins_every_declared_requirement_within_its_floor():
    """A requirement added or raised in pyproject.toml without `make lock` fails here."""
    pins = locked()
    groups = declared()
    stale = []
    for group in ("", *LOCKED_EXTRAS):
        for requirement in groups[group]:
            name = canonical(requirement.name)
            if name == "diffrl":  # the self-reference diffrl[ocr]
                continue
            versions = [next(iter(pin.specifier)).version for pin in pins.get(name, [])]
            if not versions or not all(requirement.specifier.contains(v, prereleases=True) for v in versions):
                stale.append(f"{requirement} (locked: {versions or 'absent'})")
    assert not stale, f"requirements/lock.txt is out of date, run `make lock`: {stale}"
    assert [str(p.specifier) for p in pins["setuptools"]][0].startswith("==80.")  # mmcv's setup.py: pkg_resources


def test_run_metadata_records_the_installed_set_and_the_lock():
    recorded = environment()
    assert f"torch=={importlib.metadata.version('torch')}" in recorded["installed"]
    assert len(recorded["installed"]) == len({line.split("==")[0].lower() for line in recorded["installed"]}) > 20
    assert recorded["lock"] == {"file": str(LOCK), "sha256": hashlib.sha256(LOCK.read_bytes()).hexdigest()}


def test_pip_check_is_clean():
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def dry_run(python_version: str, target: Path, extras: str) -> list[str]:
    """The documented check: the locked install resolved for another Python from binary wheels (nothing installed)."""
    return [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
        "--python-version", python_version, "--only-binary=:all:", "--target", str(target),
        "--constraint", str(LOCK), f"{ROOT}[{extras}]",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("python_version", ["3.12", "3.13"])
def test_the_locked_install_resolves_for_newer_pythons(python_version, tmp_path):
    """The extra `test` holds the default install and the extra `ocr`, so one resolution covers all three (with
    the same pins). mmdet is left out: mmcv 1.7.2 has no wheels. About a minute each: pip downloads the wheels
    (torch's too) to read their requirements, since the index serves no separate metadata files."""
    done = subprocess.run(dry_run(python_version, tmp_path, "test"), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"Python {python_version}: {(done.stdout + done.stderr)[-4000:]}"
