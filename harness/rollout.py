"""The one denoising loop. Every method and the evaluator sample through :func:`rollout`.

A :class:`Window` composes samplers along one trajectory: the given (stochastic) sampler inside a
window of steps and a deterministic solver elsewhere (optionally another one after the window),
keeping latents and log-probs only inside it (FlowGRPO-Fast's window; MixGRPO's sliding window and
MixGRPO-Flash's DPM-Solver++ after it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from harness.policy import Cond, Policy, guided_velocity, policy_device, to_device, unconditional
from harness.samplers import EulerODE, History, Sampler, Transition


@dataclass(frozen=True)
class Window:
    """Steps ``[start, start + size)`` of a trajectory use the rollout's sampler, every other step ``outside``
    (the steps after the window ``after`` instead, when given: MixGRPO-Flash's higher-order solver).

    With a window, a kept trajectory holds only the window's ``size + 1`` latents and ``size`` log-probs.
    """

    start: int
    size: int
    outside: Sampler = EulerODE()
    after: Sampler | None = None

    def __post_init__(self) -> None:
        if self.start < 0 or self.size < 1:
            raise ValueError(f"a window needs start >= 0 and size >= 1, got start={self.start}, size={self.size}")
        for where, sampler in (("outside", self.outside), ("after", self.after)):
            if sampler is not None and sampler.stochastic:
                raise ValueError(f"the sampler {where} a window must be deterministic, got {sampler.name!r}")

    def sampler_at(self, k: int, inside: Sampler) -> Sampler:
        """The sampler of step ``k``: ``inside`` within the window, ``after`` past it (if set), else ``outside``."""
        if k in self:
            return inside
        return self.after if self.after is not None and k >= self.end else self.outside

    @property
    def end(self) -> int:
        return self.start + self.size

    def __contains__(self, k: object) -> bool:
        return isinstance(k, int) and self.start <= k < self.end


@dataclass(frozen=True)
class Trajectory:
    """A batch of sampled trajectories.

    ``x0`` (B, C, H, W) is the clean sample. With ``keep_trajectory``: ``latents`` (B, K+1, C, H, W)
    from noise to x0, and for stochastic samplers ``log_probs`` (B, K) of each transition
    under the sampling weights, in the sampler's convention.
    """

    x0: Tensor
    timesteps: Tensor  # (K+1,), 1 → 0 (with a window: its size + 1 times); (B, K+1) when windows differ per sample
    latents: Tensor | None = None
    log_probs: Tensor | None = None


def draw_step_noises(
    samplers: list[Sampler], shape: torch.Size, generator: torch.Generator | None, device: torch.device
) -> dict[int, Tensor]:
    """The noise of each stochastic step k (fp32, ``shape``), drawn in step order from ``generator`` as the steps
    would draw it one by one, and moved to ``device`` in one copy."""
    steps = [k for k, step_sampler in enumerate(samplers) if step_sampler.stochastic]
    if not steps:
        return {}
    drawn = torch.stack([torch.randn(shape, generator=generator, dtype=torch.float32) for _ in steps])
    return dict(zip(steps, to_device(drawn, device).unbind(0), strict=True))


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
    window: Window | None = None,
) -> Trajectory:
    """Integrate from ``noise`` at t = timesteps[0] to timesteps[-1] with the active weights.

    Stochastic steps draw their noise from ``generator``, so a seeded generator makes the whole
    trajectory reproducible. The loop runs on the policy's device: the initial noise, the times and every
    step's noise (drawn up front, in step order, from the CPU generator) move there once, and nothing is read
    back to the host. ``track_grad`` keeps the autograd graph through every step (direct reward
    backprop); by default sampling runs without one. ``window``: ``sampler`` only inside it (see
    :class:`Window`).
    """
    device = policy_device(policy)
    x, timesteps = to_device(noise, device), to_device(timesteps, device)
    kept = range(len(timesteps)) if window is None else range(window.start, window.end + 1)
    latents, log_probs = [x] if 0 in kept else [], []
    history: History | None = None
    batch = x.shape[0]
    samplers = [sampler if window is None else window.sampler_at(k, sampler) for k in range(len(timesteps) - 1)]
    step_noises = draw_step_noises(samplers, x.shape, generator, device)
    with torch.set_grad_enabled(track_grad):
        for k, step_sampler in enumerate(samplers):
            t, t_next = timesteps[k], timesteps[k + 1]
            v = guided_velocity(policy, x, t.expand(batch), cond, uncond, guidance_scale)
            transition = step_sampler.step(v, x, t, t_next, noise=step_noises.get(k), history=history)
            if step_sampler.stochastic and keep_trajectory:
                log_probs.append(step_sampler.log_prob(transition.x_next, transition))
            history = History(transition.x0_pred, t)
            x = transition.x_next.to(noise.dtype)
            if k + 1 in kept:
                latents.append(x)
    return Trajectory(
        x0=x,
        timesteps=timesteps if window is None else timesteps[window.start : window.end + 1],
        latents=torch.stack(latents, dim=1) if keep_trajectory else None,
        log_probs=torch.stack(log_probs, dim=1) if log_probs else None,
    )


def replay_transition(
    policy: Policy,
    sampler: Sampler,
    trajectory: Trajectory,
    sel: Tensor,
    j: int | Tensor,
    cond: Cond,
    guidance_scale: float,
) -> tuple[Tensor, Transition]:
    """Retake the stored steps ``latents[sel, j] → latents[sel, j + 1]`` with the active weights.

    Returns their transition log-probs (B,) and the transitions themselves (mean, std, σ), as coupled methods
    need them for ratios, KL terms and ratio normalisation. ``j`` is one step or one per sample; the times
    come from the trajectory (per sample when its ``timesteps`` are (B, K+1)). CFG at ``guidance_scale``.
    """
    latents, times = trajectory.latents, trajectory.timesteps
    if latents is None:
        raise ValueError("replay_transition needs a trajectory sampled with keep_trajectory=True")
    x, x_next = latents[sel, j], latents[sel, j + 1]
    t, t_next = (times[sel, j], times[sel, j + 1]) if times.ndim == 2 else (times[j], times[j + 1])
    uncond = unconditional(policy, len(sel), guidance_scale)
    v = guided_velocity(policy, x, t.expand(len(sel)), cond, uncond, guidance_scale)
    transition = sampler.step(v, x, t, t_next)
    return sampler.log_prob(x_next, transition), transition
