"""Fixtures for the learned scorers: tiny random checkpoints, built once per session in a temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.rewards.tiny_scorers import save_all


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Constructor options pointing every learned reward at its tiny local checkpoint."""
    return save_all(Path(tmp_path_factory.mktemp("tiny_scorers")))
