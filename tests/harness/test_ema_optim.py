"""EMA decay schedule, swap and the official stepping; the optimizer refuses non-finite losses."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.ema import EMA
from harness.optim import OptimConfig, Optimization, method_ema_settings


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


FIXTURE = Path(__file__).resolve().parents[1] / "methods" / "fixtures" / "flow_grpo_filter_ema_official.json"


def test_interval_fires_as_the_official_wrapper():
    """``(step + 1) % interval == 0``: with interval 8 after steps 7, 15, … (official EMAModuleWrapper)."""
    param = nn.Parameter(torch.zeros(1))
    ema = EMA([param], max_decay=0.9, interval=8)
    fired = []
    for step in range(1, 25):
        with torch.no_grad():
            param.fill_(float(step))
        before = ema.shadow[0].clone()
        ema.update(step)
        if not torch.equal(before, ema.shadow[0]):
            fired.append(step)
    assert fired == [7, 15, 23]


def test_updates_per_step_hand_computed():
    """G = 2: one application after the step, the second (same θ, same decay) at the next flush: d² overall."""
    param = nn.Parameter(torch.zeros(1))
    ema = EMA([param], max_decay=0.9, interval=1, updates_per_step=2)
    with torch.no_grad():
        param.fill_(1.0)
    ema.update(1000)  # decay 0.9
    assert ema.shadow[0].item() == pytest.approx(0.1) and ema.pending == 1
    with pytest.raises(RuntimeError, match="pending"):
        ema.update(1001)
    ema.flush()
    assert ema.shadow[0].item() == pytest.approx(1 - 0.81) and ema.pending == 0
    state = ema.state_dict()
    assert state["pending"] == 0
    ema.update(1001)
    restored = EMA([param], interval=1, updates_per_step=2)
    restored.load_state_dict(ema.state_dict())
    assert restored.pending == 1 and restored.pending_decay == ema.pending_decay
    assert torch.equal(restored.shadow[0], ema.shadow[0])


@pytest.mark.parametrize("run", range(3))
def test_per_micro_batch_stepping_matches_the_official_loop(run):
    """Fixture: FlowGRPO's loop calls ``ema.step(global_step)`` after every micro-batch (official wrapper, run on
    a parameter set to θ_k at optimizer step k); the evaluations between epochs must see the same EMA."""
    official = json.loads(FIXTURE.read_text())["ema"][run]
    param = nn.Parameter(torch.zeros(3))
    ema = EMA([param], max_decay=official["decay"], interval=official["interval"],
              updates_per_step=official["grad_accum"])  # fmt: skip
    thetas = iter(official["params"])
    for epoch, snapshot in enumerate(official["snapshots"]):
        assert torch.allclose(ema.shadow[0], torch.tensor(snapshot), atol=1e-5), (epoch, run)
        if epoch == len(official["snapshots"]) - 1:
            break
        for _ in range(official["steps_per_epoch"]):  # Optimization.step's order: flush, step, update
            ema.flush()
            with torch.no_grad():
                param.copy_(torch.tensor(next(thetas)))
            ema.update(epoch * official["steps_per_epoch"] + _ + 1)


def test_optimization_flushes_before_the_step_and_takes_method_settings():
    param = nn.Parameter(torch.ones(1))
    optim = Optimization([param], OptimConfig(lr=0.1, weight_decay=0.0), ema_interval=1, ema_updates_per_step=2,
                         ema_max_decay=0.5)  # fmt: skip
    assert optim.ema.max_decay == 0.5 and optim.ema.updates_per_step == 2
    optim.backward((param**2).sum())
    optim.step()  # θ_1; decay min(2/11, 0.5): one application now, one pending
    theta_1, d1 = param.detach().clone(), 2 / 11
    shadow = d1 * 1.0 + (1 - d1) * theta_1
    assert torch.allclose(optim.ema.shadow[0], shadow)
    optim.backward((param**2).sum())
    optim.step()  # flush with θ_1 first, then θ_2's first application
    shadow = d1 * shadow + (1 - d1) * theta_1
    d2 = 3 / 12
    assert torch.allclose(optim.ema.shadow[0], d2 * shadow + (1 - d2) * param.detach())
    with pytest.raises(ValueError, match="ema_max_decay must be in"):
        Optimization([param], OptimConfig(), ema_max_decay=1.0)


def test_method_ema_settings_reads_only_the_fields_a_config_has():
    from methods.awm import AWMConfig
    from methods.diffusion_nft import DiffusionNFTConfig
    from methods.flow_grpo import FlowGRPOConfig

    assert method_ema_settings(DiffusionNFTConfig()) == {"ema_interval": 1}
    assert method_ema_settings(FlowGRPOConfig()) == {"ema_interval": 8, "ema_updates_per_step": 2}
    assert method_ema_settings(AWMConfig()) == {"ema_interval": 1, "ema_max_decay": 0.99}


def test_deferred_loss_checks_stop_the_step_before_the_weights_change():
    param = nn.Parameter(torch.ones(2))
    optim = Optimization([param], OptimConfig(lr=0.1, weight_decay=0.0), defer_loss_checks=True)
    optim.backward((param**2).sum())
    assert optim.step() == pytest.approx(float(2 * torch.ones(2).norm())) and (param < 1).all()
    before = param.detach().clone()
    optim.backward(param.sum())
    optim.backward(param.sum() * float("nan"))  # no check, no host sync here
    with pytest.raises(FloatingPointError, match="non-finite loss nan at optimizer step 2"):
        optim.step()
    assert torch.equal(param.detach(), before) and optim.global_step == 1
