"""EMA decay schedule and swap; the optimizer refuses non-finite losses."""

import pytest
import torch
from torch import nn

from harness.ema import EMA
from harness.optim import OptimConfig, Optimization


def test_ema_decay_warmup_and_swap():
    param = nn.Parameter(torch.zeros(3))
    ema = EMA([param], max_decay=0.9)
    assert ema.decay(1) == pytest.approx(2 / 11) and ema.decay(1000) == 0.9
    with torch.no_grad():
        param.fill_(1.0)
    ema.update(1)
    expected = 1 - 2 / 11  # shadow = d·0 + (1 − d)·1
    assert torch.allclose(ema.shadow[0], torch.full((3,), expected))
    with ema.applied():
        assert torch.allclose(param, torch.full((3,), expected))
    assert torch.equal(param.detach(), torch.ones(3))
    interval = EMA([param], interval=8)
    interval.update(3)
    assert torch.equal(interval.shadow[0], torch.ones(3))  # only every 8th step


def test_optimization_steps_and_rejects_nan():
    param = nn.Parameter(torch.ones(2))
    optim = Optimization([param], OptimConfig(lr=0.1, weight_decay=0.0))
    optim.backward((param**2).sum())
    optim.step()
    assert optim.global_step == 1 and (param < 1).all()
    with pytest.raises(FloatingPointError, match="non-finite loss nan at optimizer step 2"):
        optim.backward(param.sum() * float("nan"))
    with pytest.raises(ValueError, match="no trainable parameters"):
        Optimization([], OptimConfig())
