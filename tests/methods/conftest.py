"""A tiny random policy over the shapes vocabulary, cheap enough for method tests."""

import pytest
import torch

from benchmarks.shapes.world import VOCABULARY
from harness.policies.tiny_dit import TinyDiT, TinyDiTConfig, TinyDiTPolicy


@pytest.fixture
def tiny_policy() -> TinyDiTPolicy:
    torch.manual_seed(0)
    cfg = TinyDiTConfig(vocabulary=VOCABULARY, hidden=16, depth=1, heads=2, text_layers=1, patch_size=8)
    model = TinyDiT(cfg)
    with torch.no_grad():  # leave the adaLN-Zero start so that v depends on the input
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return TinyDiTPolicy(model)
