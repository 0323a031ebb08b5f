"""The forward-process baselines' shared pieces: noising, the FM error, training times, accumulation, collection."""

import pytest
import torch

from harness.policy import Cond
from harness.samplers import CPS, DPMSolverPP2M, FlowSDE, noised
from methods.base import Rollout
from methods.forward_process import (
    RefreshedFlowMatching,
    crossed_multiple,
    flow_matching_error,
    group_members,
    logit_normal_times,
    make_collection_sampler,
    train_weighted_flow_matching,
    weighted_flow_matching_loss,
)
from methods.raft import RAFTConfig
from tests.methods.forward_smoke import group_prompts

# Sample 1: x0 = (0, 2), ε = (2, 0) → u = ε − x0 = (2, −2); v = (1, −1) → errors (−1, 1) → mean² = 1.
# Sample 2: x0 = (1, 1), ε = (1, 1) → u = (0, 0); v = (3, 0) → mean((9, 0)) = 4.5.
X0 = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
NOISE = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
V = torch.tensor([[1.0, -1.0], [3.0, 0.0]])


def test_flow_matching_error_and_weighted_loss_hand_computed():
    assert flow_matching_error(V, X0, NOISE).tolist() == [1.0, 4.5]
    assert flow_matching_error(NOISE - X0, X0, NOISE).abs().max() == 0  # the minimiser is the FM target
    v = V.clone().requires_grad_(True)
    weights = torch.tensor([0.5, 1.5])
    loss = weighted_flow_matching_loss(v, X0, NOISE, weights)
    assert loss.item() == pytest.approx((0.5 * 1.0 + 1.5 * 4.5) / 2)  # 3.625
    loss.backward()
    # d/dv of w_i·mean_d (v − u)²/B = w_i·2(v − u)/(D·B), D = 2, B = 2.
    assert torch.allclose(v.grad, weights[:, None] * 2 * (V - (NOISE - X0)) / (2 * 2))
    # Unit weights: plain flow matching, the mean of the per-sample errors (RAFT's loss on its kept samples).
    assert weighted_flow_matching_loss(V, X0, NOISE, torch.ones(2)).item() == pytest.approx((1.0 + 4.5) / 2)
    with pytest.raises(ValueError, match="weights must have shape"):
        weighted_flow_matching_loss(V, X0, NOISE, torch.ones(3))


def test_logit_normal_times_hand_computed():
    z = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    u = torch.sigmoid(z)
    plain = logit_normal_times(1000, torch.Generator().manual_seed(3))
    assert torch.allclose(plain, u)  # shift 1: t = sigmoid(N(0, 1))
    shifted = logit_normal_times(1000, torch.Generator().manual_seed(3), shift=3.0)
    assert torch.allclose(shifted, 3 * u / (1 + 2 * u))
    assert ((shifted > 0) & (shifted < 1)).all() and (shifted >= plain).all()  # the shift moves t towards noise
    # The median u = 1/2 maps to s/(1 + s): 0.75 for s = 3.
    assert shifted.median().item() == pytest.approx(0.75, abs=0.03) and plain.median().item() == pytest.approx(
        0.5, abs=0.03
    )


def test_group_members_crossed_multiple_and_the_collection_sampler():
    members = group_members(torch.tensor([7, 3, 7, 3, 5]))
    assert [m.tolist() for m in members] == [[0, 2], [1, 3], [4]]
    assert crossed_multiple(39, 40, 40) and not crossed_multiple(40, 79, 40) and crossed_multiple(38, 81, 40)
    with pytest.raises(ValueError, match="interval"):
        crossed_multiple(0, 1, 0)
    sde = make_collection_sampler("flow_sde", 0.3)
    assert isinstance(sde, FlowSDE) and sde.noise_level == 0.3
    assert isinstance(make_collection_sampler("cps", 0.8), CPS)
    assert isinstance(make_collection_sampler("dpm2", 0.7), DPMSolverPP2M)  # the noise level is not passed on


class LinearPolicy:
    """v = a·x_t + b·t + c (c from the condition): enough to check gradients by hand."""

    def __init__(self) -> None:
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.tensor(-0.7))

    def velocity(self, x_t, t, cond):
        return self.a * x_t + self.b * t[:, None, None, None] + cond.tensors["c"]


class RecordingOptim:
    """Accumulates like :class:`harness.optim.Optimization` and records each step's gradients."""

    def __init__(self, params) -> None:
        self.params, self.global_step, self.grads = params, 0, []

    def backward(self, loss, scale=1.0):
        (loss * scale).backward()

    def step(self):
        self.grads.append([p.grad.clone() for p in self.params])
        for p in self.params:
            p.grad = None
        self.global_step += 1
        return 0.0


def test_accumulated_gradient_is_the_plain_mean_over_samples_and_draws():
    # 5 samples in micro-batches of 2 (2, 2, 1), 2 draws each: the accumulated gradient must be that of
    # mean over all (sample, draw) of w·ℓ, the smaller last batch not over-weighted.
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 1, 2, 2, generator=g)
    rollout = Rollout([], torch.zeros(5, dtype=torch.long), Cond({"c": torch.randn(5, 1, 1, 1, generator=g)}), x0)
    indices, weights = torch.tensor([4, 0, 2, 1, 3]), torch.tensor([0.5, 2.0, 1.0, 0.0, 3.0])
    policy = LinearPolicy()
    optim = RecordingOptim([policy.a, policy.b])
    logs = train_weighted_flow_matching(policy, optim, rollout, indices, weights, draws_per_sample=2,
                                        train_batch_size=2, optimizer_steps=1, shift=2.0,
                                        generator=torch.Generator().manual_seed(9))  # fmt: skip
    # Replay the same draws (draw-major, then micro-batches in order) and take the plain mean.
    replay, terms = torch.Generator().manual_seed(9), []
    reference = LinearPolicy()
    for _ in range(2):
        for batch in (slice(0, 2), slice(2, 4), slice(4, 5)):
            sel = indices[batch]
            t = logit_normal_times(len(sel), replay, 2.0)
            noise = torch.randn(x0[sel].shape, generator=replay)
            v = reference.velocity(noised(x0[sel], noise, t), t, rollout.cond[sel])
            terms.append(weights[batch] * flow_matching_error(v, x0[sel], noise))
    expected = torch.cat(terms).mean()
    expected.backward()
    assert len(optim.grads) == 1
    assert torch.allclose(optim.grads[0][0], reference.a.grad, atol=1e-6)
    assert torch.allclose(optim.grads[0][1], reference.b.grad, atol=1e-6)
    assert logs["train/loss"] == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="align"):
        train_weighted_flow_matching(policy, optim, rollout, indices, weights[:3], draws_per_sample=1,
                                     train_batch_size=2, optimizer_steps=1, shift=1.0, generator=g)  # fmt: skip


def test_mean_over_all_samples_scales_each_step_by_its_share():
    """``mean_over = N``: a step's loss is ``Σ_trained w·ℓ / (N/steps)``, the zero-weight samples left out."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 1, 2, 2, generator=g)
    rollout = Rollout([], torch.zeros(6, dtype=torch.long), Cond({"c": torch.randn(6, 1, 1, 1, generator=g)}), x0)
    indices, weights = torch.tensor([1, 4, 5]), torch.ones(3)
    grads = []
    for mean_over in (None, 6):
        policy = LinearPolicy()
        optim = RecordingOptim([policy.a, policy.b])
        train_weighted_flow_matching(policy, optim, rollout, indices, weights, draws_per_sample=1, train_batch_size=2,
                                     optimizer_steps=1, shift=1.0, generator=torch.Generator().manual_seed(3),
                                     mean_over=mean_over)  # fmt: skip
        grads.append(optim.grads[0])
    for kept_mean, all_mean in zip(*grads, strict=True):
        assert torch.allclose(all_mean, kept_mean * 3 / 6, atol=1e-7)
    with pytest.raises(ValueError, match="mean_over"):
        train_weighted_flow_matching(LinearPolicy(), RecordingOptim([]), rollout, indices, weights, draws_per_sample=1,
                                     train_batch_size=2, optimizer_steps=1, shift=1.0, generator=g, mean_over=2)  # fmt: skip


def test_refreshed_flow_matching_collects_with_old_and_validates(tiny_policy):
    from harness.optim import OptimConfig, Optimization

    optim = Optimization(tiny_policy.trainable_parameters(), OptimConfig(lr=1e-3))
    core = RefreshedFlowMatching(RAFTConfig(sampler="flow_sde", noise_level=0.5, num_steps=3), tiny_policy, optim)
    assert isinstance(core.sampler, FlowSDE) and core.sampler.noise_level == 0.5 and len(core.schedule) == 4
    prompts, groups = group_prompts(2, 3)
    rollout = core.collect(prompts, groups, torch.Generator().manual_seed(0))
    assert rollout.x0.shape == (6, *tiny_policy.sample_shape) and torch.equal(rollout.group_ids, groups)
    logs = core.train(rollout, torch.tensor([1, 4]), torch.ones(2), torch.Generator().manual_seed(1))
    assert logs["train/sampler_refreshed"] == 1.0 and "train/grad_norm" in logs
    with pytest.raises(ValueError, match="sample_refresh_interval"):
        RefreshedFlowMatching(RAFTConfig(sample_refresh_interval=0), tiny_policy, optim)
