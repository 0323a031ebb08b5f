"""Fixtures shared by the harness tests: the tiny SD3 and FLUX pipelines, built and saved once per session.

Tests only read these folders (a test that needs to change one copies it first).
"""

from pathlib import Path

import pytest

from tests.harness.policies.tiny_flux import save_tiny_flux_pipeline
from tests.harness.policies.tiny_sd3 import save_tiny_sd3_pipeline


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD3.5-like pipeline saved with ``save_pretrained`` (random weights, offline)."""
    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny FLUX.1-dev-like pipeline saved with ``save_pretrained`` (guidance embedding, random weights)."""
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux"))
