"""Stateless flow samplers: one ``step(v, x, t, t_next)`` per algorithm, with the transition's
mean and std as first-class outputs so that log-probs never need a patched scheduler.

Convention: ``x_t = (1 − t)·x0 + t·ε``, ``v = ε − x0``, sampling runs t: 1 → 0, and
``dt = t_next − t < 0``. Unlike diffusers' schedulers nothing advances a hidden step index:
a multistep solver is handed the previous step's data prediction explicitly, so any step can be
replayed at train time.

| sampler | order | stochastic | source |
|---|---|---|---|
| ``euler`` | 1 | no | the ODE ``dx = v dt`` (= DDIM η=0 for rectified flow) |
| ``dpm2`` | 2 | no | DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2) in λ = log((1−t)/t); DiffusionNFT's collector |
| ``flow_sde`` | 1 | yes | FlowGRPO (arXiv 2505.05470) Eq. 9, σ_t = a·sqrt(t/(1−t)) |
| ``cps`` | 1 | yes | Coefficients-Preserving Sampling (arXiv 2509.05952), FlowGRPO's ``sde_type="cps"`` |
| ``dance_sde`` | 1 | yes | DanceGRPO (arXiv 2505.07818), constant noise η: ``flux_step(sde_solver=True)`` |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class Transition:
    """One sampler step: ``x_next ~ N(mean, std²)`` (``std = 0`` for ODE steps).

    ``x_next`` is ``mean + std·noise`` with the caller's noise, or ``mean`` when none was given (replaying a
    stored transition only needs its mean and std). ``x0_pred`` is the step's data prediction ``x_t − t·v``
    (what a multistep solver reuses). ``sigma`` is the step's noise scale in the convention FlowGRPO's KL
    divides by: the Flow-SDE's σ_t *without* sqrt(−dt) (official ``std_dev_t``), CPS's step std s,
    the Dance-SDE's η, 0 for ODEs.
    """

    x_next: Tensor
    mean: Tensor
    std: Tensor  # (B, 1, ..., 1), broadcastable to x
    x0_pred: Tensor
    sigma: Tensor  # (B, 1, ..., 1)


@dataclass(frozen=True)
class History:
    """What a multistep solver needs from the previous step."""

    x0_pred: Tensor
    t: Tensor


def _per_sample(t: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or (B,) time to (B, 1, ..., 1) in fp32, on ``like``'s device (a number is filled in
    there, never copied from the host)."""
    if isinstance(t, Tensor):
        t = t.to(like.device, torch.float32, non_blocking=True)
    else:
        t = torch.full((), t, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std²) averaged over non-batch dims, in fp32 (FlowGRPO's convention)."""
    x, mean, std = x.float(), mean.float(), std.float()
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return log_density.mean(dim=tuple(range(1, x.ndim)))


def noised(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """The forward process ``x_t = (1 − t)·x0 + t·ε`` for a (B,) time and samples of any rank (B, ...)."""
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({x0.shape[0]},), got {tuple(t.shape)}")
    t_ = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t_) * x0 + t_ * noise


def flow_schedule(num_steps: int, shift: float = 1.0) -> Tensor:
    """``num_steps + 1`` times from 1 to 0, uniform then shifted: t' = s·t / (1 + (s − 1)·t) (SD3)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1.0, 0.0, num_steps + 1)
    return shift * t / (1 + (shift - 1) * t)


class Sampler(Protocol):
    """A stateless step of a flow sampler: every step kind (ODE solvers, Flow-SDE, CPS) has this one API.

    A sampler never draws randomness: a stochastic step takes the caller's ``noise`` (the rollout draws it
    from its seeded generator), and without it returns the transition's mean and std for replaying a stored
    step (training log-probs).
    """

    name: ClassVar[str]
    stochastic: ClassVar[bool]

    def step(
        self, v: Tensor, x: Tensor, t: Tensor | float, t_next: Tensor | float, *,
        noise: Tensor | None = None, history: History | None = None,
    ) -> Transition:  # fmt: skip
        """Advance x from t to t_next given the velocity v at (x, t)."""
        ...

    def log_prob(self, x_next: Tensor, transition: Transition) -> Tensor:
        """(B,) log-density of x_next under the transition, in this sampler's convention."""
        ...


def _deterministic(x_next: Tensor, x0_pred: Tensor) -> Transition:
    zero = torch.zeros(x_next.shape[0], *([1] * (x_next.ndim - 1)), device=x_next.device)
    return Transition(x_next, x_next, zero, x0_pred, zero)


class EulerODE:
    """``x_next = x + (t_next − t)·v``: the probability-flow ODE's Euler step."""

    name: ClassVar[str] = "euler"
    stochastic: ClassVar[bool] = False

    def step(self, v: Tensor, x: Tensor, t: Tensor | float, t_next: Tensor | float, *,
             noise: Tensor | None = None, history: History | None = None) -> Transition:  # fmt: skip
        t_, t_next_ = _per_sample(t, x), _per_sample(t_next, x)
        return _deterministic(x + (t_next_ - t_) * v, x - t_ * v)

    def log_prob(self, x_next: Tensor, transition: Transition) -> Tensor:
        raise TypeError("the Euler ODE is deterministic: it has no transition log-prob (use flow_sde or cps)")


class DPMSolverPP2M:
    """DPM-Solver++(2M) for rectified flow (data prediction, exponential integrator in λ).

    With α = 1 − t, σ = t, λ = log(α/σ) and h = λ_next − λ:
    ``x_next = (σ_next/σ)·x − α_next·(e^{−h} − 1)·D``, where ``D = x̂0`` on the first step and
    ``D = (1 + 1/(2r))·x̂0 − 1/(2r)·x̂0_prev`` (r = h_prev/h) after it. As in DiffusionNFT's
    ``dpm2`` solver, the first step (t = 1, λ = −∞) and the last step (t_next = 0) are DDIM
    steps, which equal Euler for rectified flow; the last returns x̂0. Which step is which is chosen per sample
    on the device (``torch.where``, no host sync); the second-order value of such a sample is not finite and
    is discarded, so no gradient may flow through a DPM step.
    """

    name: ClassVar[str] = "dpm2"
    stochastic: ClassVar[bool] = False

    @staticmethod
    def _lambda(t: Tensor) -> Tensor:
        return torch.log(1 - t) - torch.log(t)

    def step(self, v: Tensor, x: Tensor, t: Tensor | float, t_next: Tensor | float, *,
             noise: Tensor | None = None, history: History | None = None) -> Transition:  # fmt: skip
        t_, t_next_ = _per_sample(t, x), _per_sample(t_next, x)
        x0_pred = x - t_ * v
        euler = x + (t_next_ - t_) * v
        if history is None:
            return _deterministic(euler, x0_pred)
        t_prev = _per_sample(history.t, x)
        lam, lam_next, lam_prev = self._lambda(t_), self._lambda(t_next_), self._lambda(t_prev)
        h, h_prev = lam_next - lam, lam - lam_prev
        r = h_prev / h
        d = (1 + 1 / (2 * r)) * x0_pred - (1 / (2 * r)) * history.x0_pred
        x_next = (t_next_ / t_) * x - (1 - t_next_) * torch.expm1(-h) * d
        return _deterministic(torch.where((t_ >= 1) | (t_next_ <= 0), euler, x_next), x0_pred)

    def log_prob(self, x_next: Tensor, transition: Transition) -> Tensor:
        raise TypeError("DPM-Solver++(2M) is deterministic: it has no transition log-prob (use flow_sde or cps)")


class FlowSDE:
    """FlowGRPO's Flow-SDE step (arXiv 2505.05470, Eq. 9; ``sde_step_with_logprob`` in the official code).

    ``σ_t = a·sqrt(t/(1 − t))`` with the official guard at t = 1 (the denominator uses the schedule's next
    time, which at t = 1 is its second entry), ``μ = x·(1 + σ_t²·dt/(2t)) + v·(1 + σ_t²·(1 − t)/(2t))·dt``
    and ``x_next = μ + σ_t·sqrt(−dt)·ε``, in fp32. Its log-prob is the Gaussian log-density averaged over
    non-batch dims (official). ``noise_level = 0`` reduces it to the Euler ODE.
    """

    name: ClassVar[str] = "flow_sde"
    stochastic: ClassVar[bool] = True

    def __init__(self, noise_level: float = 0.7) -> None:
        self.noise_level = noise_level

    def step(self, v: Tensor, x: Tensor, t: Tensor | float, t_next: Tensor | float, *,
             noise: Tensor | None = None, history: History | None = None) -> Transition:  # fmt: skip
        v, x = v.float(), x.float()
        t_, t_next_ = _per_sample(t, x), _per_sample(t_next, x)
        dt = t_next_ - t_
        sigma = self.noise_level * torch.sqrt(t_ / (1 - torch.where(t_ >= 1, t_next_, t_)))
        mean = x * (1 + sigma**2 / (2 * t_) * dt) + v * (1 + sigma**2 * (1 - t_) / (2 * t_)) * dt
        std = sigma * torch.sqrt(-dt)
        x_next = mean if noise is None else mean + std * noise
        return Transition(x_next, mean, std, x - t_ * v, sigma)

    def log_prob(self, x_next: Tensor, transition: Transition) -> Tensor:
        return gaussian_log_prob(x_next, transition.mean, transition.std)


class CPS:
    """Coefficients-Preserving Sampling (Wang & Yu, arXiv 2509.05952; FlowGRPO ``sde_type="cps"``).

    ``s = t_next·sin(η·π/2)``, ``x̂0 = x − t·v``, ``x̂1 = x + (1 − t)·v``,
    ``μ = (1 − t_next)·x̂0 + sqrt(t_next² − s²)·x̂1``, ``x_next = μ + s·ε``.
    Its log-prob follows the official code: ``−mean((x_next − μ)²)``, constants and the 1/(2s²)
    factor dropped, so CPS ratios (and clip ranges) are on another scale than Flow-SDE's.
    """

    name: ClassVar[str] = "cps"
    stochastic: ClassVar[bool] = True

    def __init__(self, noise_level: float = 0.8) -> None:
        self.noise_level = noise_level

    def step(self, v: Tensor, x: Tensor, t: Tensor | float, t_next: Tensor | float, *,
             noise: Tensor | None = None, history: History | None = None) -> Transition:  # fmt: skip
        v, x = v.float(), x.float()
        t_, t_next_ = _per_sample(t, x), _per_sample(t_next, x)
        s = t_next_ * math.sin(self.noise_level * math.pi / 2)
        x0_pred, x1_pred = x - t_ * v, x + (1 - t_) * v
        mean = (1 - t_next_) * x0_pred + torch.sqrt(t_next_**2 - s**2) * x1_pred
        return Transition(mean if noise is None else mean + s * noise, mean, s, x0_pred, s)

    def log_prob(self, x_next: Tensor, transition: Transition) -> Tensor:
        return -((x_next.float() - transition.mean) ** 2).mean(dim=tuple(range(1, x_next.ndim)))


class DanceSDE:
    """DanceGRPO's SDE step (Xue et al., arXiv 2505.07818; official ``flux_step(..., sde_solver=True)``).

    The reverse SDE ``dx = (v − ½·η²·∇log p_t(x))·dt + η·dw`` with the constant noise η (the paper's ε_t) and
    the score of the rectified flow estimated from the data prediction, ``∇log p_t ≈ −(x − (1 − t)·x̂0)/t²``
    with ``x̂0 = x − t·v``. Euler–Maruyama: ``μ = x + v·dt − ½·η²·score·dt`` (dt = t_next − t < 0) and
    ``x_next = μ + η·sqrt(−dt)·ε``, in fp32. ``sigma`` is η (the std without sqrt(−dt), as FlowSDE's σ_t).
    Its log-prob is DanceGRPO's: the Gaussian log-density averaged over non-batch dims (MixGRPO's copy drops
    the constant terms, which cancel in every ratio). ``noise_level = 0`` is the Euler ODE.
    """

    name: ClassVar[str] = "dance_sde"
    stochastic: ClassVar[bool] = True

    def __init__(self, noise_level: float = 0.3) -> None:
        self.noise_level = noise_level

    def step(self, v: Tensor, x: Tensor, t: Tensor | float, t_next: Tensor | float, *,
             noise: Tensor | None = None, history: History | None = None) -> Transition:  # fmt: skip
        v, x = v.float(), x.float()
        t_, t_next_ = _per_sample(t, x), _per_sample(t_next, x)
        dt = t_next_ - t_
        x0_pred = x - t_ * v
        score = -(x - x0_pred * (1 - t_)) / t_**2
        mean = x + dt * v - 0.5 * self.noise_level**2 * score * dt
        std = self.noise_level * torch.sqrt(-dt)
        x_next = mean if noise is None else mean + std * noise
        return Transition(x_next, mean, std, x0_pred, torch.full_like(std, self.noise_level))

    def log_prob(self, x_next: Tensor, transition: Transition) -> Tensor:
        return gaussian_log_prob(x_next, transition.mean, transition.std)


SAMPLERS: dict[str, type[EulerODE] | type[DPMSolverPP2M] | type[FlowSDE] | type[CPS] | type[DanceSDE]] = {
    cls.name: cls for cls in (EulerODE, DPMSolverPP2M, FlowSDE, CPS, DanceSDE)
}


def make_sampler(name: str, noise_level: float | None = None) -> Sampler:
    """Build a sampler by name; ``noise_level`` only applies to the stochastic ones."""
    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    cls = SAMPLERS[name]
    if noise_level is None:
        return cls()
    if cls is FlowSDE or cls is CPS or cls is DanceSDE:
        return cls(noise_level)
    raise ValueError(f"sampler {name!r} is deterministic and takes no noise_level")
