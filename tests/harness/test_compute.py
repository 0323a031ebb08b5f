"""The compute meter: a known sequence of policy calls gives known counts."""

import pytest
import torch

from harness.compute import CountingPolicy, Ledger
from harness.rollout import rollout
from harness.samplers import EulerODE, FlowSDE, flow_schedule


def test_known_sequence_of_calls(tiny_policy):
    ledger = Ledger()
    policy = CountingPolicy(tiny_policy, ledger)
    cond, uncond = policy.encode(["a circle"] * 3), policy.encode([""] * 3)
    noise = torch.randn(3, *policy.sample_shape)
    with ledger.phase("sampling"):
        traj = rollout(policy, EulerODE(), cond, noise, flow_schedule(4))  # 4 steps × 3 samples
        rollout(policy, FlowSDE(), cond, noise, flow_schedule(2), guidance_scale=4.5, uncond=uncond)  # CFG: 2 × 2 × 3
        policy.decode(traj.x0)
    assert ledger.forward["sampling"] == 12 + 12 and ledger.backward["sampling"] == 0
    assert ledger.images["sampling"] == 3
    with ledger.phase("training"):
        x_t, t = torch.randn(2, *policy.sample_shape), torch.rand(2)
        with torch.no_grad(), policy.use_weights("old"):
            policy.velocity(x_t, t, cond[:2])
        policy.velocity(x_t, t, cond[:2]).sum().backward()  # θ with grad: forward + backward
        with torch.no_grad(), policy.use_weights("ref"):
            policy.velocity(x_t, t, cond[:2])
    assert ledger.forward["training"] == 6 and ledger.backward["training"] == 2
    with ledger.phase("eval"), torch.no_grad():
        policy.velocity(x_t, t, cond[:2])
    assert ledger.forward["eval"] == 2
    assert ledger.fwd_equiv == 24 + 6 + 2 * 2  # eval excluded
    assert ledger.flops_per_forward is not None and ledger.flops_per_forward > 0
    assert ledger.flops == pytest.approx(ledger.fwd_equiv * ledger.flops_per_forward)
    row = ledger.snapshot()
    assert row["compute/fwd_equiv"] == 34 and row["compute/images_sampled"] == 3


def test_flops_are_measured_once_per_sample(tiny_policy):
    ledger = Ledger()
    policy = CountingPolicy(tiny_policy, ledger)
    cond = policy.encode(["a circle"] * 4)
    with torch.no_grad():
        policy.velocity(torch.randn(4, *policy.sample_shape), torch.rand(4), cond)
    per_sample = ledger.flops_per_forward
    with torch.no_grad():
        policy.velocity(torch.randn(1, *policy.sample_shape), torch.rand(1), cond[:1])
    assert ledger.flops_per_forward == per_sample and ledger.forward["other"] == 5


def test_phase_time_is_counted_once():
    ledger = Ledger()
    with ledger.phase("training"), ledger.phase("reward"):
        sum(range(10000))
    assert ledger.seconds["reward"] > 0 and ledger.seconds["training"] >= 0
    assert ledger.seconds["other"] == 0
    with pytest.raises(ValueError, match="unknown phase 'sample'"), ledger.phase("sample"):  # type: ignore[arg-type]
        pass
