"""Evaluation of a policy on a benchmark: fixed prompts, fixed initial noise, one sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmarks.base import Benchmark, Prompt
from harness.policy import Policy, WeightSet, iter_batches
from harness.rollout import rollout
from harness.samplers import Sampler, flow_schedule
from harness.seeding import generator


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """How eval images are made (defaults: 10-step Euler ODE without CFG, the weights θ)."""

    num_steps: int = 10
    guidance_scale: float = 1.0
    shift: float = 1.0
    batch_size: int = 128
    weights: WeightSet = "train"


@dataclass(frozen=True)
class EvalOutput:
    scores: dict[str, float]
    images: Tensor  # (N, 3, H, W) in [0, 1], prompt-major: image j of prompt i at i·images_per_prompt + j
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
) -> EvalOutput:
    """Sample every eval image under the chosen weights and score them with the benchmark's metric."""
    prompts = benchmark.eval_prompts()
    expanded = [p for p in prompts for _ in range(benchmark.images_per_prompt)]
    noise = eval_noise(benchmark, policy.sample_shape, len(prompts))
    timesteps = flow_schedule(settings.num_steps, settings.shift)
    images = []
    batches = list(iter_batches(len(expanded), settings.batch_size))
    with torch.no_grad(), policy.use_weights(settings.weights):
        for index, batch in enumerate(tqdm(batches, desc=f"eval {benchmark.name}", unit="batch", disable=not progress)):
            texts = [p.text for p in expanded[batch]]
            cond = policy.encode(texts)
            uncond = policy.encode([""] * len(texts)) if settings.guidance_scale != 1.0 else None
            traj = rollout(
                policy, sampler, cond, noise[batch], timesteps, guidance_scale=settings.guidance_scale, uncond=uncond,
                generator=generator(benchmark.eval_seed, "eval-sampler", index),
            )  # fmt: skip
            images.append(policy.decode(traj.x0))
    all_images = torch.cat(images)
    return EvalOutput(benchmark.evaluate(all_images, expanded), all_images, expanded)
