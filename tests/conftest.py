"""Shared test setup: offline hub, fixed threads, the shared reference data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
THREADS = 2  # also in the worker processes that import this module: their numbers match the tests'
torch.set_num_threads(THREADS)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def fixed_threads():
    """Every test starts with THREADS torch threads (commands under test, e.g. pretraining, set their own)."""
    torch.set_num_threads(THREADS)
    yield


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


def make_tiny_policy(seed: int = 0, depth: int = 1):
    """A tiny random DiT policy over the shapes vocabulary, perturbed off its adaLN-Zero start
    so that v depends on the input; cheap enough for unit tests."""
    from harness.policies.tiny_dit import TinyDiT, TinyDiTConfig, TinyDiTPolicy
    from harness.shapes_world.world import VOCABULARY

    torch.manual_seed(seed)
    cfg = TinyDiTConfig(vocabulary=VOCABULARY, hidden=16, depth=depth, heads=2, text_layers=1, patch_size=8)
    model = TinyDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return TinyDiTPolicy(model)


@pytest.fixture
def tiny_policy():
    return make_tiny_policy()
