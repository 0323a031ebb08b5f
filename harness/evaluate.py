"""Evaluation of a policy on a benchmark: fixed prompts, fixed initial noise, one sampler.

Besides the benchmark's scores, every evaluation keeps each eval prompt's own scores (the
benchmark's metrics on that prompt's images alone): the eval-sampling error of a score is a
bootstrap over them (:mod:`harness.statistics`), and two variants' scores pair up prompt by prompt.
:class:`EvalNoise` reads them back for the tables, with an analytic binomial error for results
written before they were stored.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch import Tensor
from tqdm.auto import tqdm

from benchmarks.base import Benchmark
from harness.distributed import SINGLE, Processes
from harness.geneval_rules import TASKS
from harness.policy import WEIGHT_SETS, Policy, WeightSet, iter_batches, unconditional
from harness.rollout import rollout
from harness.samplers import Sampler, flow_schedule
from harness.seeding import generator
from harness.statistics import binomial_standard_error, eval_standard_error, paired_difference, prompt_metric
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


PROMPT_SCORES_FILE = "eval_prompts.parquet"  # a suite's per-prompt outcomes, one row per (evaluation, prompt)


@dataclass(frozen=True)
class PromptScores:
    """Each eval prompt's scores: the benchmark's metrics on that prompt's images alone (NaN: not scored,
    e.g. a per-task metric on another task's prompt). ``tags[i]`` is prompt i's task."""

    tags: tuple[str, ...]
    scores: dict[str, tuple[float, ...]]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able record (NaN as null)."""
        return {
            "tags": list(self.tags),
            "scores": {m: [None if math.isnan(v) else v for v in values] for m, values in self.scores.items()},
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> PromptScores:
        scores = {
            m: tuple(math.nan if v is None else float(v) for v in values) for m, values in record["scores"].items()
        }
        return cls(tuple(record["tags"]), scores)


def prompt_scores(benchmark: Benchmark, images: Tensor, prompts: Sequence[Prompt]) -> PromptScores:
    """Score each eval prompt's images (prompt-major, ``images_per_prompt`` each) with the benchmark alone.

    This calls ``benchmark.evaluate`` once per prompt: on the shapes world it adds about one more pass
    of the rule-based judge to each evaluation.
    """
    k = benchmark.images_per_prompt
    if len(prompts) != images.shape[0] or len(prompts) % k:
        raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompt slots; expected {k} per eval prompt")
    each = [benchmark.evaluate(images[i : i + k], prompts[i : i + k]) for i in range(0, len(prompts), k)]
    metrics = list(dict.fromkeys([*benchmark.metrics, *(m for scores in each for m in scores)]))
    return PromptScores(
        tuple(prompts[i].tag for i in range(0, len(prompts), k)),
        {m: tuple(float(scores.get(m, math.nan)) for scores in each) for m in metrics},
    )


def prompt_scores_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Records ``{variant, seed, iteration, eval_point, tags, scores}`` → one row per (evaluation, prompt)
    with ``prompt`` (its index in the eval set), ``tag`` and ``eval/<metric>`` columns."""
    frames = []
    for record in records:
        scores = PromptScores.from_json(record)
        frame = pd.DataFrame({f"eval/{m}": values for m, values in scores.scores.items()})
        frame.insert(0, "tag", list(scores.tags))
        frame.insert(0, "prompt", range(len(scores.tags)))
        for i, key in enumerate(("variant", "seed", "iteration", "eval_point")):
            frame.insert(i, key, record.get(key))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@dataclass(frozen=True)
class EvalOutput:
    scores: dict[str, float]
    # (N, 3, H, W) in [0, 1], prompt-major: image j of prompt i at i·images_per_prompt + j.
    # Only the main process of a launch holds them (None on the others, which made their share).
    images: Tensor | None
    prompts: list[Prompt]
    per_prompt: PromptScores | None = None  # on the main process only, like the images


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
    every process runs the same passes, which FSDP's all-gathers need. Sampling runs on the policy's device
    (the eval noise is drawn on the CPU and moved with each batch); the images come back to the host.
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
        uncond = unconditional(policy, len(texts), settings.guidance_scale)
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
            if parts is not None:  # images are kept and scored on the host: one read per eval batch
                gathered.extend(part.cpu() for part in parts)
            bar.update(min(processes.world_size, len(batches) - round_index * processes.world_size))
    bar.close()
    all_images = torch.cat(gathered) if processes.is_main else None
    return _scored(benchmark, all_images, expanded, processes)


def _scored(benchmark: Benchmark, images: Tensor | None, prompts: list[Prompt], processes: Processes) -> EvalOutput:
    """The main process (the one holding ``images``) scores them, per prompt too; every process gets the scores."""
    scores: dict[str, float] | None = None
    per_prompt: PromptScores | None = None
    if images is not None:  # the main process
        try:
            scores = benchmark.evaluate(images, prompts)
            per_prompt = prompt_scores(benchmark, images, prompts)
        except Exception as error:  # shared first, so that the other processes stop too instead of waiting
            processes.broadcast_from_main(f"{type(error).__name__}: {error}")
            raise
    shared = processes.broadcast_from_main(scores)  # on the others, a string is the main process's error
    if isinstance(shared, str):
        raise RuntimeError(f"the main process failed to score the evaluation ({shared})")
    assert shared is not None  # the main process scored (or raised above)
    return EvalOutput(shared, images, prompts, per_prompt)


def eval_set_sizes(suite_file: Path) -> dict[str, int] | None:
    """Images per GenEval task in the eval set of the suite that ``suite_file`` (a resolved suite.yaml) ran."""
    from harness.suite import BenchmarkSpec, make_benchmark

    spec = yaml.safe_load(suite_file.read_text())["benchmark"]
    benchmark = make_benchmark(BenchmarkSpec(**spec))
    counts = Counter(p.tag for p in benchmark.eval_prompts())
    sizes = {tag: n * benchmark.images_per_prompt for tag, n in counts.items() if tag in TASKS}
    return sizes or None


class EvalNoise:
    """Where eval-sampling errors come from: stored per-prompt scores (``eval_prompts.parquet``), else the
    analytic binomial error of the per-task accuracies, sized by the suite's eval set (``suite.yaml``)."""

    def __init__(
        self, prompts: pd.DataFrame | None = None, images_per_task: dict[str, int] | None = None,
        suite_file: Path | None = None,
    ) -> None:  # fmt: skip
        """``prompts``: per-prompt scores (:func:`prompt_scores_frame`); the eval set's images per task, given or
        read (when first needed) from the ``suite_file`` that ran the results."""
        self.prompts, self._sizes, self.suite_file = prompts, images_per_task, suite_file
        keys = ["variant", "seed", "iteration"]
        self._groups = dict(tuple(prompts.sort_values("prompt").groupby(keys))) if prompts is not None else {}

    @classmethod
    def load(cls, results: Path) -> EvalNoise:
        """From a suite folder, or the folder of a results table."""
        folder = results if results.is_dir() else results.parent
        prompts, suite = folder / PROMPT_SCORES_FILE, folder / "suite.yaml"
        return cls(pd.read_parquet(prompts) if prompts.is_file() else None, None, suite if suite.is_file() else None)

    @functools.cached_property
    def images_per_task(self) -> dict[str, int] | None:
        if self._sizes is not None or self.suite_file is None:
            return self._sizes
        return eval_set_sizes(self.suite_file)

    def _matrix(self, rows: pd.DataFrame, metric: str) -> tuple[np.ndarray, list[str]] | None:
        """(S, N) per-prompt scores of the evaluations ``rows``; None unless each is stored and adds up to its score."""
        parts = [self._groups.get((r.variant, r.seed, r.iteration)) for r in rows.itertuples()]
        if not parts or any(p is None or metric not in p.columns for p in parts):
            return None
        tags = list(parts[0]["tag"])  # type: ignore[index]
        values = np.stack([p[metric].to_numpy(dtype=float) for p in parts])  # type: ignore[index]
        if any(list(p["tag"]) != tags for p in parts) or not np.allclose(  # type: ignore[index]
            prompt_metric(values, tags), rows[metric].to_numpy(dtype=float), atol=1e-6
        ):
            return None  # not GenEval's mean over tasks of means over prompts: no prompt bootstrap
        return values, tags

    def standard_error(self, rows: pd.DataFrame, metric: str) -> tuple[float, str]:
        """SE of the seed-mean ``metric`` over the evaluations ``rows`` and its source (``prompts``, ``binomial``, "")."""
        matrix = self._matrix(rows, metric) if "iteration" in rows.columns else None
        if matrix is not None:
            return eval_standard_error(matrix[0].mean(axis=0), matrix[1]), "prompts"
        sizes, name = self.images_per_task, metric.removeprefix("eval/")
        if sizes is None:
            return math.nan, ""
        if name in sizes:
            return binomial_standard_error({name: rows[metric].mean()}, sizes), "binomial"
        if name == "overall" and all(f"eval/{t}" in rows.columns for t in sizes):
            return binomial_standard_error({t: rows[f"eval/{t}"].mean() for t in sizes}, sizes), "binomial"
        return math.nan, ""

    def paired_standard_error(self, rows: pd.DataFrame, reference: pd.DataFrame, metric: str) -> float:
        """SE of the difference of two variants' seed-mean ``metric``, paired prompt by prompt (NaN: not stored)."""
        if "iteration" not in rows.columns:
            return math.nan
        ours, theirs = self._matrix(rows, metric), self._matrix(reference, metric)
        if ours is None or theirs is None or ours[1] != theirs[1]:
            return math.nan
        return paired_difference(ours[0], theirs[0], ours[1])[1]

    def _prompt_count(self) -> int:
        return len(next(iter(self._groups.values()))) if self._groups else 0

    def describe(self, scores: pd.DataFrame, metrics: list[str]) -> str:
        sources = {scores[f"{m}/se_source"].iloc[i] for m in metrics for i in range(len(scores))}
        parts = []
        if "prompts" in sources:
            parts.append(f"bootstrap over the {self._prompt_count()} eval prompts, stratified by task "
                         f"(per-prompt scores in {PROMPT_SCORES_FILE})")  # fmt: skip
        if "binomial" in sources:
            sizes = sorted(set((self.images_per_task or {}).values()))
            parts.append(f"† analytic binomial error of the per-task accuracies over {'/'.join(map(str, sizes))} "
                         "images per task (per-prompt scores were not stored; it treats a prompt's images as "
                         "independent, so it can understate the error)")  # fmt: skip
        if "" in sources:
            parts.append("none where no value follows ± (no per-prompt scores, and no suite.yaml to size the eval set)")
        return "; ".join(parts)

    def describe_paired(self) -> str:
        if self._groups:
            return f"bootstrap over the {self._prompt_count()} eval prompts of the per-prompt differences"
        return "not available: per-prompt scores were not stored (run the suite again to store them)"
