"""DRaFT-K / DRaFT-LV / ReFL: the losses, hand-computed gradients through the last K steps, compute, refusals."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor, nn

from benchmarks.shapes.benchmark import ShapesBenchmark
from harness.config import ConfigError, build
from harness.optim import OptimConfig, Optimization
from harness.policy import Cond
from harness.samplers import flow_schedule
from harness.trainer import LoopConfig, build_method, train
from harness.types import Prompt, RewardSpec
from methods.draft import DRAFT_LV, REFL, DRaFT, DRaFTConfig, reward_loss
from rewards.shapes import ShapesGenEval
from tests.methods.forward_smoke import Redness, counted, group_prompts


class ScalarFlow:
    """v_θ(x, t) = θ·x with one scalar θ: Euler steps multiply x by (1 − θ·Δ), so gradients are closed-form."""

    sample_shape = (1, 1, 1)
    supports_cfg = False

    def __init__(self, theta: float) -> None:
        self.theta = nn.Parameter(torch.tensor(theta))

    def encode(self, prompts: list[str]) -> Cond:
        return Cond({"tokens": torch.zeros(len(prompts), 1)})

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.theta * x_t

    def decode(self, x0: Tensor) -> Tensor:
        return x0

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.theta]

    @contextmanager
    def use_weights(self, which: str) -> Iterator[None]:
        yield

    def update_old(self, eta: float) -> None:
        pass


class Identity:
    """r(image) = its single pixel value."""

    spec = RewardSpec(name="identity", version="test", description="the pixel", differentiable=True)

    def __call__(self, images: Tensor, prompts: object) -> Tensor:
        return images.flatten(1).mean(dim=1)


def gradient_of_update(cfg: DRaFTConfig, theta: float = 0.3, batch: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dθ seen by the optimizer, the collected chain's latents, x0) for one update on ScalarFlow."""
    policy = ScalarFlow(theta)
    optim = Optimization(
        policy.trainable_parameters(), OptimConfig(lr=1e-3, weight_decay=0.0)
    )  # grads are read before the one step
    grads: list[Tensor] = []
    step = optim.step
    optim.step = lambda: (grads.append(policy.theta.grad.clone()), step())[1]  # type: ignore[method-assign]
    method = DRaFT(cfg, policy, optim, Identity())  # type: ignore[arg-type]
    prompts = [Prompt("p")] * batch
    rollout = method.collect(prompts, torch.zeros(batch, dtype=torch.long), torch.Generator().manual_seed(0))
    method.update(rollout, torch.zeros(batch), torch.Generator().manual_seed(1))
    latents = rollout.trajectory.latents if rollout.trajectory is not None else None
    return grads[0], latents, rollout.x0


def test_reward_losses_by_hand():
    scores = torch.tensor([0.2, 0.8])
    assert reward_loss(scores, "negative").item() == pytest.approx(-0.5)
    assert reward_loss(scores, "refl_relu", margin=2.0).item() == pytest.approx((1.8 + 1.2) / 2)
    assert reward_loss(scores, "refl_relu", margin=0.5).item() == pytest.approx((0.3 + 0.0) / 2)
    with pytest.raises(ValueError, match="loss must be"):
        reward_loss(scores, "hinge")  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_draft_k_gradient_flows_through_exactly_the_last_k_steps(k):
    # Euler with T uniform steps: x_{j+1} = (1 − θ/T)·x_j, so L = −mean(x0) = −mean((1 − θ/T)^K · sg(x_{T−K}))
    # and dL/dθ = mean(K/T · (1 − θ/T)^(K−1) · x_{T−K}); K = T is full backprop through the chain.
    steps, theta = 4, 0.3
    grad, latents, _ = gradient_of_update(DRaFTConfig(num_steps=steps, last_k=k), theta)
    x_start = latents[:, 0].flatten()  # the stored state K steps before the end
    expected = (k / steps * (1 - theta / steps) ** (k - 1) * x_start).mean()
    assert grad.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_rerun_reproduces_the_collected_samples(tiny_policy):
    method, _ = counted(DRaFT, DRaFTConfig(num_steps=4, last_k=2), tiny_policy, reward=Redness())
    prompts, groups = group_prompts(2, 2)
    rollout = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    assert rollout.trajectory.latents.shape[1] == 3  # states at steps 2, 3 and 4 (= x0)
    x0_hat, rows, step = method._regenerate(rollout, torch.arange(4), torch.Generator())
    assert step == 2 and rows.tolist() == [0, 1, 2, 3] and x0_hat.requires_grad
    torch.testing.assert_close(x0_hat.detach(), rollout.x0, rtol=1e-5, atol=1e-6)


def test_refl_one_step_prediction_at_a_random_late_step():
    # ReFL: x̂0 = x_s − t_s·θ·x_s, so with L = λ·ReLU(2 − x̂0) (x̂0 < 2 here): dL/dθ = λ·mean(t_s·x_s).
    steps, theta = 8, 0.3
    cfg = DRaFTConfig(num_steps=steps, truncation="random_step", loss="refl_relu", loss_scale=1e-3)
    assert cfg.refl_steps() == (6, 8)
    grad, latents, _ = gradient_of_update(cfg, theta)
    schedule = flow_schedule(steps)
    candidates = [1e-3 * (schedule[s] * latents[:, s - 6].flatten()).mean().item() for s in (6, 7)]
    assert any(grad.item() == pytest.approx(c, rel=1e-5) for c in candidates)
    assert REFL.refl_steps() == (7, 10) and DRaFTConfig(num_steps=40, truncation="random_step").refl_steps() == (30, 40)
    assert REFL.loss == "refl_relu" and REFL.loss_scale == 1e-3 and REFL.refl_margin == 2.0


def test_draft_lv_noises_the_final_sample_n_times():
    # LV: x_{t1}^i = (1 − t1)·x0 + t1·ε_i, x̂0^i = (1 − t1·θ)·x_{t1}^i, dL/dθ = mean_i,b(t1·x_{t1}^i).
    steps, theta, batch, n = 4, 0.3, 3, 2
    cfg = DRaFTConfig(num_steps=steps, lv_samples=n)
    grad, latents, x0 = gradient_of_update(cfg, theta, batch)
    assert latents is None  # LV restarts from x0 alone
    t1 = flow_schedule(steps)[-2]
    noise = torch.randn((batch * n, 1, 1, 1), generator=torch.Generator().manual_seed(1))
    x_t1 = (1 - t1) * x0.repeat_interleave(n, dim=0) + t1 * noise
    assert grad.item() == pytest.approx((t1 * x_t1).mean().item(), rel=1e-5)
    assert DRAFT_LV.lv_samples == 2 and DRAFT_LV.last_k == 1


@pytest.mark.parametrize(
    ("cfg", "per_sample", "images"),
    [(DRaFTConfig(num_steps=4, last_k=2), 2, 1), (DRaFTConfig(num_steps=4, lv_samples=3), 3, 3),
     (DRaFTConfig(num_steps=4, truncation="random_step"), 1, 1)],
)  # fmt: skip
def test_every_pass_is_counted(tiny_policy, cfg, per_sample, images):
    method, ledger = counted(DRaFT, cfg, tiny_policy, reward=Redness())
    prompts, groups = group_prompts(2, 3)
    with ledger.phase("sampling"):
        rollout = method.collect(prompts, groups, torch.Generator().manual_seed(0))
    with ledger.phase("training"):
        logs = method.update(rollout, torch.zeros(6), torch.Generator().manual_seed(1))
    assert ledger.forward["sampling"] == 6 * 4 and ledger.backward["sampling"] == 0
    assert ledger.forward["training"] == ledger.backward["training"] == 6 * per_sample
    assert ledger.images["training"] == 6 * images  # each re-run image (LV: each copy) is decoded for the reward
    assert set(logs) == {"train/loss", "train/reward_rerun", "train/first_grad_step", "train/grad_norm"}


def test_config_refuses_what_cannot_work():
    for bad, match in [
        ({"sampler": "dpm2"}, "only the single-step Euler"),
        ({"last_k": 0}, "last_k"),
        ({"last_k": 11}, "last_k"),
        ({"lv_samples": 2, "last_k": 2}, "DRaFT-LV"),
        ({"refl_step_range": (0.9, 0.95), "truncation": "random_step"}, "refl_step_range"),
        ({"truncation": "first_k"}, "truncation"),
    ]:
        with pytest.raises(ValueError, match=match):
            DRaFTConfig(**bad)
    with pytest.raises(ConfigError, match=r"suite.methods\[0\].config: sampler = 'dpm2'"):
        build(DRaFTConfig, {"sampler": "dpm2"}, where="suite.methods[0].config")


def test_a_non_differentiable_reward_is_refused_before_any_compute(tiny_policy):
    with pytest.raises(ValueError, match="'shapes_geneval', which is not differentiable"):
        build_method(DRaFT, DRaFTConfig(), tiny_policy, OptimConfig(), ShapesGenEval())
    with pytest.raises(ValueError, match="was given no reward"):
        build_method(DRaFT, DRaFTConfig(), tiny_policy, OptimConfig())
    bench = ShapesBenchmark(prompts_per_task=1, images_per_prompt=1)

    def no_compute(*args: object) -> None:
        raise AssertionError("a velocity call ran before the refusal")

    tiny_policy.velocity = no_compute  # the base-model evaluation would be the first call
    with pytest.raises(ValueError, match="not differentiable"):
        train(DRaFT, DRaFTConfig(), tiny_policy, bench, ShapesGenEval(), LoopConfig(iterations=1), OptimConfig(),
              progress=False)  # fmt: skip


def test_two_iterations_raise_the_differentiable_reward(tiny_policy):
    loop = LoopConfig(iterations=3, prompts_per_iteration=2, images_per_prompt=4, evaluate=False)
    bench = ShapesBenchmark(prompts_per_task=1, images_per_prompt=1)
    result = train(DRaFT, DRaFTConfig(num_steps=3), tiny_policy, bench, Redness(), loop, OptimConfig(lr=3e-3),
                   progress=False)  # fmt: skip
    rewards = [row["train/reward_mean"] for row in result.iterations]
    assert rewards[-1] > rewards[0]  # the reward's gradient, followed with a large lr, raises it
