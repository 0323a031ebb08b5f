"""Direct reward backprop: DRaFT-K / DRaFT-LV (Clark et al., ICLR 2024) and ReFL (Xu et al., NeurIPS 2023).

Both maximise a *differentiable* reward by backpropagating its gradient into the sampler
(the notes' Part 2, "direct reward backprop"; no log-probs, no advantages, no groups):

* **DRaFT-K** (``truncation="last_k"``): sample with θ; only the last K steps keep a graph;
  ``L(θ) = −r(decode(x0), c)`` and ``∇θ L`` flows through those K steps (truncated backprop,
  DRaFT Alg. 1; K = 1 is the paper's best cost/benefit).
* **DRaFT-LV** (``lv_samples = n > 0``, K = 1): the final sample is noised again ``n`` times to
  the last step's time, ``x_{t_1}^i = (1 − t_1)·sg(x0) + t_1·ε_i``, each is denoised by one step
  with a graph, and the loss averages ``−r`` over the n copies (lower-variance gradient of the
  last step; the notes: "LV uses several noise samples at the last step").
* **ReFL** (``truncation="random_step"``, :data:`REFL`): denoise without a graph to a random late
  step ``s`` (official: 30–39 of 40, here ``refl_step_range`` as fractions of the steps), predict
  ``x̂0 = x_s − t_s·v_θ(x_s, t_s)`` in one step with a graph, and minimise
  ``λ·φ(r(x̂0, c))`` with ``φ(r) = ReLU(margin − r)`` (margin 2, λ = ``grad_scale`` 1e-3 in
  ImageReward's ``ReFL.py``).

How it sits on the shared loop. ``collect`` samples the whole chain without a graph (the loop
scores those images for its logs and curves) and stores the states from which the gradient
steps start. ``update`` re-runs just those steps *with* a graph from the stored states, decodes,
scores with the differentiable training reward and backpropagates. With a deterministic solver
and θ unchanged since collection (one optimizer step per iteration, the default), the re-run
reproduces the collected steps exactly, so the gradient is DRaFT's; the price is K (or n, or 1)
extra forwards per sample, which the compute meter counts. Only the Euler solver (DDIM η = 0 for
rectified flow, the DDIM both papers sample with) is accepted: it restarts from any stored state
without solver history.

Deviations, stated: no official DRaFT code exists (the notes); ReFL's interleaved pretraining loss
is omitted (the harness has no pretraining data). The default sampling is CFG-free (the shapes
model; both papers sample with CFG, set ``guidance_scale``). The reward model's own forward and
backward passes are not policy passes, so ``fwd_equiv`` does not count them (as for every method's
reward); they are in the wall-clock time of the training phase.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from harness.accumulate import MicroBatch, accumulate
from harness.optim import Optimization
from harness.policy import Cond, Policy, policy_device, to_device, unconditional
from harness.rollout import Trajectory, rollout
from harness.samplers import flow_schedule, make_sampler, noised
from harness.types import Prompt, Reward, check_score_shape
from harness.validation import check_at_least, check_finite, check_literals, check_positive
from methods.base import Capabilities, Rollout

Truncation = Literal["last_k", "random_step"]
RewardLoss = Literal["negative", "refl_relu"]


@dataclass(frozen=True, kw_only=True)
class DRaFTConfig:
    """DRaFT-K by default (K = 1); :data:`DRAFT_LV` and :data:`REFL` are the other two variants."""

    truncation: Truncation = "last_k"  # DRaFT-K; "random_step": ReFL's one-step x̂0 at a random late step
    last_k: int = 1  # K, the final sampling steps that receive gradient
    lv_samples: int = 0  # n of DRaFT-LV (0: plain DRaFT-K); needs last_k = 1
    refl_step_range: tuple[float, float] = (0.75, 1.0)  # ReFL's stop step s ∈ [lo·T, hi·T) (official 30–39 of 40)
    loss: RewardLoss = "negative"  # −r (DRaFT) or ReLU(refl_margin − r) (ReFL's φ)
    refl_margin: float = 2.0
    loss_scale: float = 1.0  # λ; ReFL's grad_scale is 1e-3
    sampler: str = "euler"  # must restart from a stored state: the Euler ODE (DDIM η = 0)
    num_steps: int = 10
    shift: float = 1.0
    guidance_scale: float = 1.0  # deviation: both papers sample with CFG (see the module docstring)
    train_batch_size: int = 32
    optimizer_steps_per_iteration: int = 1  # > 1: later steps re-run from states sampled by an older θ
    ema_interval: int = 1

    def __post_init__(self) -> None:
        if self.sampler != "euler":
            raise ValueError(
                f"sampler = {self.sampler!r}: DRaFT/ReFL re-run their last steps from stored states, which only the "
                "single-step Euler ODE can do without solver history; use sampler: euler (DDIM eta=0)"
            )
        check_literals(self)
        check_at_least(self, 1, "num_steps", "train_batch_size", "optimizer_steps_per_iteration", "ema_interval")
        check_positive(self, "loss_scale", "shift", "guidance_scale")
        check_at_least(self, 0, "lv_samples")
        check_finite(self, "refl_margin")
        if not 1 <= self.last_k <= self.num_steps:
            raise ValueError(f"last_k must be in [1, num_steps={self.num_steps}], got {self.last_k}")
        if self.lv_samples < 0 or (self.lv_samples and (self.last_k != 1 or self.truncation != "last_k")):
            raise ValueError(f"lv_samples = {self.lv_samples}: DRaFT-LV needs lv_samples >= 1 with last_k = 1")
        low, high = self.refl_step_range
        if not 0.0 <= low < high <= 1.0 or self.refl_steps()[0] >= self.refl_steps()[1]:
            raise ValueError(
                f"refl_step_range = {self.refl_step_range} must satisfy 0 <= lo < hi <= 1 and hold at least one "
                f"of the {self.num_steps} steps"
            )

    def refl_steps(self) -> tuple[int, int]:
        """ReFL's stop steps as indices ``[first, last)`` into the sampling schedule (40 steps: 30..39)."""
        low, high = self.refl_step_range
        return int(low * self.num_steps), int(high * self.num_steps)

    def first_restart_step(self) -> int | None:
        """The earliest stored state ``update`` restarts from (None: DRaFT-LV restarts from x0)."""
        if self.lv_samples:
            return None
        return self.num_steps - self.last_k if self.truncation == "last_k" else self.refl_steps()[0]


DRAFT_LV = DRaFTConfig(lv_samples=2)  # the paper's DRaFT-LV with n = 2 [recall]
REFL = DRaFTConfig(truncation="random_step", loss="refl_relu", loss_scale=1e-3)  # ImageReward's ReFL.py


def reward_loss(scores: Tensor, kind: RewardLoss, margin: float = 2.0) -> Tensor:
    """``mean(−r)`` (DRaFT) or ``mean(ReLU(margin − r))`` (ReFL's φ); scores (B,) keep their graph."""
    if kind == "negative":
        return -scores.mean()
    if kind == "refl_relu":
        return torch.relu(margin - scores).mean()
    raise ValueError(f"loss must be 'negative' or 'refl_relu', got {kind!r}")


class DRaFT:
    """DRaFT-K, DRaFT-LV and ReFL on the common interface (see the module docstring)."""

    Config: ClassVar[type] = DRaFTConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        needs_differentiable_reward=True, guidance_fields=("guidance_scale",), sampler_field="sampler"
    )

    def __init__(self, cfg: DRaFTConfig, policy: Policy, optim: Optimization, reward: Reward) -> None:
        """``reward`` is the training reward (``capabilities.needs_differentiable_reward``); it must be differentiable."""
        if not reward.spec.differentiable:
            raise ValueError(
                f"DRaFT backpropagates through the reward, but {reward.spec.name!r} is not differentiable "
                "(its spec says differentiable=False); train with a differentiable reward, e.g. shapes_classifier"
            )
        self.cfg, self.policy, self.optim, self.reward = cfg, policy, optim, reward
        self.sampler = make_sampler(cfg.sampler)
        self.schedule = to_device(flow_schedule(cfg.num_steps, cfg.shift), policy_device(policy))

    def _uncond(self, n: int) -> Cond | None:
        return unconditional(self.policy, n, self.cfg.guidance_scale)

    def collect(self, prompts: Sequence[Prompt], group_ids: Tensor, generator: torch.Generator) -> Rollout:
        texts = [p.text for p in prompts]
        noise = torch.randn((len(texts), *self.policy.sample_shape), generator=generator)
        first = self.cfg.first_restart_step()
        with self.policy.use_weights("train"):
            cond = self.policy.encode(texts)
            full = rollout(self.policy, self.sampler, cond, noise, self.schedule, guidance_scale=self.cfg.guidance_scale,
                           uncond=self._uncond(len(texts)), keep_trajectory=first is not None)  # fmt: skip
        stored = None  # the states update restarts from: steps first..T of the chain
        if first is not None and full.latents is not None:
            stored = Trajectory(full.x0, self.schedule[first:], full.latents[:, first:])
        return Rollout(list(prompts), group_ids, cond, full.x0, stored)

    def _regenerate(self, rollout_: Rollout, sel: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, int]:
        """Re-run the gradient steps for samples ``sel``: (x̂0 with a graph, each copy's sample, the start step)."""
        cfg, schedule = self.cfg, self.schedule
        rows, step = sel, cfg.num_steps - 1
        if cfg.lv_samples:  # DRaFT-LV: n fresh noisings of sg(x0) to the last step's time, one step each
            rows = sel.repeat_interleave(cfg.lv_samples)
            t_last = schedule[-2].expand(len(rows))
            noise = to_device(torch.randn(rollout_.x0[rows].shape, generator=generator), t_last.device)
            start = noised(rollout_.x0[rows], noise, t_last)
            times = schedule[-2:]
        elif cfg.truncation == "last_k":  # DRaFT-K: the stored state K steps before the end
            assert rollout_.trajectory is not None and rollout_.trajectory.latents is not None
            start, times = rollout_.trajectory.latents[sel, 0], rollout_.trajectory.timesteps
            step = cfg.num_steps - cfg.last_k
        else:  # ReFL: a random late step s, then x̂0 = x_s − t_s·v in one Euler step to t = 0
            assert rollout_.trajectory is not None and rollout_.trajectory.latents is not None
            first, last = cfg.refl_steps()
            step = int(torch.randint(first, last, (1,), generator=generator))  # a CPU draw: no device sync
            start = rollout_.trajectory.latents[sel, step - first]
            times = torch.stack([schedule[step], schedule[-1]])
        with self.policy.use_weights("train"):
            x0_hat = rollout(self.policy, self.sampler, rollout_.cond[rows], start.detach(), times,
                             guidance_scale=cfg.guidance_scale, uncond=self._uncond(len(rows)), track_grad=True).x0  # fmt: skip
        return x0_hat, rows, step

    def update(self, rollout: Rollout, rewards: Tensor, generator: torch.Generator) -> dict[str, float]:
        cfg = self.cfg
        items = torch.arange(len(rollout.prompts), device=rollout.x0.device)
        # Each chunk's items are read back once, as it starts, for the prompts the reward scores with.
        return accumulate(self.optim, items, functools.partial(self._loss, rollout),
                          generator=generator, optimizer_steps=cfg.optimizer_steps_per_iteration,
                          batch_size=cfg.train_batch_size, pad=rollout.shared, equal_passes=rollout.equal_passes,
                          on_chunk=lambda _, chunk, __: chunk.tolist())  # fmt: skip

    def _loss(self, rollout: Rollout, batch: MicroBatch) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Re-run the gradient steps of one micro-batch, decode, score with the training reward: the reward loss."""
        cfg = self.cfg
        x0_hat, rows, step = self._regenerate(rollout, batch.items, batch.generator)
        items = [0] if batch.filler else batch.chunk_state[batch.positions]  # rows, read back with the chunk
        prompts = [rollout.prompts[i] for i in items for _ in range(cfg.lv_samples or 1)]
        scores = self.reward(self.policy.decode(x0_hat), prompts)
        scores = check_score_shape(self.reward.spec.name, scores, len(rows))  # finiteness: the optimizer's check
        loss = cfg.loss_scale * reward_loss(scores, cfg.loss, cfg.refl_margin)
        # first_grad_step: the step the gradient starts at (ReFL: the mean of its random stop steps)
        return loss, {"loss": loss.detach(), "reward_rerun": scores.detach().mean(), "first_grad_step": float(step)}
