"""Evaluation of a policy on a benchmark: fixed prompts, fixed initial noise, one sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmarks.base import Benchmark
from harness.distributed import SINGLE, Processes
from harness.policy import WEIGHT_SETS, Policy, WeightSet, iter_batches
from harness.rollout import rollout
from harness.samplers import Sampler, flow_schedule
from harness.seeding import generator
from harness.types import Prompt
from harness.validation import require


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """How eval images are made (defaults: 10-step Euler ODE without CFG, the weights θ)."""

    num_steps: int = 10
    guidance_scale: float = 1.0
    shift: float = 1.0
    batch_size: int = 128
    weights: WeightSet = "train"

    def __post_init__(self) -> None:
        for name in ("num_steps", "batch_size"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        scale = self.guidance_scale
        require(math.isfinite(scale) and scale >= 1, "guidance_scale", scale, "a finite number >= 1 (1: no guidance)")
        require(math.isfinite(self.shift) and self.shift > 0, "shift", self.shift, "a finite number > 0")
        require(self.weights in WEIGHT_SETS, "weights", self.weights, f"one of {', '.join(WEIGHT_SETS)}")


@dataclass(frozen=True)
class EvalOutput:
    scores: dict[str, float]
    # (N, 3, H, W) in [0, 1], prompt-major: image j of prompt i at i·images_per_prompt + j.
    # Only the main process of a launch holds them (None on the others, which made their share).
    images: Tensor | None
    prompts: list[Prompt]


def eval_noise(benchmark: Benchmark, shape: tuple[int, ...], n_prompts: int) -> Tensor:
    """Initial noise of eval image j of prompt i, drawn from ``(eval_seed, "eval", i, j)``."""
    k = benchmark.images_per_prompt
    return torch.stack(
        [
            torch.randn(shape, generator=generator(benchmark.eval_seed, "eval", i, j))
            for i in range(n_prompts)
            for j in range(k)
        ]
    )


def evaluate_policy(
    policy: Policy,
    benchmark: Benchmark,
    sampler: Sampler,
    settings: EvalSettings = EvalSettings(),
    *,
    progress: bool = True,
    processes: Processes = SINGLE,
) -> EvalOutput:
    """Sample every eval image under the chosen weights and score them with the benchmark's metric.

    With several processes the batches are dealt round-robin (batch b to process b mod P), each
    process samples and decodes its own, and the images are gathered on the main process after every
    round; it scores them and every process returns its scores. The batches, their noise and their
    sampler seeds are the single process's, so the scores do not depend on the process count. A
    process left without a batch in the last round samples one filler image (counted, discarded), so
    every process runs the same passes, which FSDP's all-gathers need.
    """
    prompts = benchmark.eval_prompts()
    expanded = [p for p in prompts for _ in range(benchmark.images_per_prompt)]
    noise = eval_noise(benchmark, policy.sample_shape, len(prompts))
    timesteps = flow_schedule(settings.num_steps, settings.shift)
    batches = list(iter_batches(len(expanded), settings.batch_size))
    rounds = -(-len(batches) // processes.world_size)
    gathered: list[Tensor] = []

    def sample(index: int, batch: slice) -> Tensor:
        texts = [p.text for p in expanded[batch]]
        cond = policy.encode(texts)
        uncond = policy.encode([""] * len(texts)) if settings.guidance_scale != 1.0 else None
        traj = rollout(
            policy, sampler, cond, noise[batch], timesteps, guidance_scale=settings.guidance_scale, uncond=uncond,
            generator=generator(benchmark.eval_seed, "eval-sampler", index),
        )  # fmt: skip
        return policy.decode(traj.x0)

    bar = tqdm(
        total=len(batches), desc=f"eval {benchmark.name}", unit="batch", disable=not progress or not processes.is_main
    )
    with torch.no_grad(), policy.use_weights(settings.weights):
        for round_index in range(rounds):
            index = round_index * processes.world_size + processes.rank
            filler = index >= len(batches)  # the same passes as a real batch, nothing kept
            images = sample(0, slice(0, 1))[:0] if filler else sample(index, batches[index])
            parts = processes.gather_on_main(images)
            if parts is not None:
                gathered.extend(parts)
            bar.update(min(processes.world_size, len(batches) - round_index * processes.world_size))
    bar.close()
    all_images = torch.cat(gathered) if processes.is_main else None
    scores: dict[str, float] | None = None
    if all_images is not None:  # the main process
        try:
            scores = benchmark.evaluate(all_images, expanded)
        except Exception as error:  # shared first, so that the other processes stop too instead of waiting
            processes.broadcast_from_main(f"{type(error).__name__}: {error}")
            raise
    shared = processes.broadcast_from_main(scores)  # on the others, a string is the main process's error
    if isinstance(shared, str):
        raise RuntimeError(f"the main process failed to score the evaluation ({shared})")
    assert shared is not None  # the main process scored (or raised above)
    return EvalOutput(shared, all_images, expanded)
