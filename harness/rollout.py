"""The one denoising loop. Every method and the evaluator sample through :func:`rollout`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from harness.policy import Cond, Policy, guided_velocity
from harness.samplers import History, Sampler


@dataclass(frozen=True)
class Trajectory:
    """A batch of sampled trajectories.

    ``x0`` (B, C, H, W) is the clean sample. With ``keep_trajectory``: ``latents`` (B, K+1, C, H, W)
    from noise to x0, and for stochastic samplers ``log_probs`` (B, K) of each transition
    under the sampling weights, in the sampler's convention.
    """

    x0: Tensor
    timesteps: Tensor  # (K+1,), 1 → 0
    latents: Tensor | None = None
    log_probs: Tensor | None = None


def rollout(
    policy: Policy,
    sampler: Sampler,
    cond: Cond,
    noise: Tensor,
    timesteps: Tensor,
    *,
    guidance_scale: float = 1.0,
    uncond: Cond | None = None,
    generator: torch.Generator | None = None,
    keep_trajectory: bool = False,
    track_grad: bool = False,
) -> Trajectory:
    """Integrate from ``noise`` at t = timesteps[0] to timesteps[-1] with the active weights.

    Stochastic samplers draw their step noise from ``generator``, so a seeded generator makes
    the whole trajectory reproducible. ``track_grad`` keeps the autograd graph through every step
    (direct reward backprop); by default sampling runs without one.
    """
    x = noise
    latents, log_probs = [x], []
    history: History | None = None
    batch = x.shape[0]
    with torch.set_grad_enabled(track_grad):
        for k in range(len(timesteps) - 1):
            t, t_next = timesteps[k], timesteps[k + 1]
            v = guided_velocity(policy, x, t.expand(batch), cond, uncond, guidance_scale)
            step_noise = torch.randn(x.shape, generator=generator, dtype=torch.float32) if sampler.stochastic else None
            transition = sampler.step(v, x, t, t_next, noise=step_noise, history=history)
            if sampler.stochastic and keep_trajectory:
                log_probs.append(sampler.log_prob(transition.x_next, transition))
            history = History(transition.x0_pred, t)
            x = transition.x_next.to(noise.dtype)
            latents.append(x)
    return Trajectory(
        x0=x,
        timesteps=timesteps,
        latents=torch.stack(latents, dim=1) if keep_trajectory else None,
        log_probs=torch.stack(log_probs, dim=1) if log_probs else None,
    )
