"""The one training loop every method shares.

collect (sampling) → decode and reward (sampling / reward) → method.update (training) → EMA and
soft updates inside the method's optimizer steps → evaluate the EMA weights on schedule.
Prompts, initial noise and eval noise come from :mod:`harness.seeding`, so two methods with the
same seed see the same training prompts and the same eval images' noise.

With several processes (``accelerate launch``; :mod:`harness.distributed`) each samples and
scores its share of the batch, the rewards are gathered, gradients averaged before every
optimizer step, compute counters summed over the processes; every process samples its share of
each evaluation, which the main process scores and records, and the main process checkpoints.
Under FSDP (:mod:`harness.fsdp`) the policy is sharded first, FSDP's backward averages the
gradients, and every process gathers each checkpoint, which the main process writes.

With a checkpoint path the loop is resumable: it saves θ, θ_old, the optimizer, the EMA, the
ledger, the prompt generator and its logs atomically after every evaluation and every
``checkpoint_every`` iterations, and a rerun continues from there. Every other random draw is a
pure function of ``(seed, role, iteration)``, so a resumed run gives the same numbers on the CPU
as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.base import Benchmark
from harness.budget import Budget
from harness.compute import PHASES, CountingPolicy, Ledger
from harness.distributed import SINGLE, Processes
from harness.evaluate import EvalOutput, EvalSettings, evaluate_policy
from harness.fsdp import shard_policy, zero_missing_gradients
from harness.optim import OptimConfig, Optimization, method_ema_settings
from harness.policy import Policy, synchronize, to_device
from harness.resume import LoopState, load_checkpoint, save_checkpoint
from harness.samplers import SAMPLERS, Sampler, make_sampler
from harness.seeding import generator, numpy_rng
from harness.types import Reward, check_scores
from harness.validation import require

if TYPE_CHECKING:
    from methods.base import Method

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Batch geometry, budget and eval schedule of one training run."""

    iterations: int = 20  # the cap on iterations
    budget: Budget | None = None  # also stop once it is spent, and evaluate at its fractions
    prompts_per_iteration: int = 16
    images_per_prompt: int = 8  # group size
    seed: int = 0
    eval_every: int = 0  # also evaluate every N iterations (0: only before and after training, and budget points)
    evaluate: bool = True  # False only for speed measurements
    eval_sampler: str = "euler"
    eval: EvalSettings = field(default_factory=EvalSettings)
    checkpoint_every: int = 5  # iterations between checkpoints (with a checkpoint path; evaluations always save)

    def __post_init__(self) -> None:
        for name in ("iterations", "prompts_per_iteration", "images_per_prompt", "checkpoint_every"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        for name in ("seed", "eval_every"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        require(self.eval_sampler in SAMPLERS, "eval_sampler", self.eval_sampler, f"one of {', '.join(SAMPLERS)}")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line (training logs, evaluation rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@dataclass
class TrainResult:
    """Per-iteration training logs and one row per evaluation (with every compute counter)."""

    iterations: list[dict[str, float]]
    evaluations: list[dict[str, float]]
    ledger: Ledger
    resumed_from: int = 0  # the iteration a checkpoint resumed at (0: a fresh run)
    session_seconds: dict[str, float] = field(default_factory=dict)  # per phase, this session only


def build_method(
    method_cls: type[Method],
    method_cfg: Any,
    policy: Policy,
    optim_cfg: OptimConfig,
    reward: Reward | None = None,
    processes: Processes = SINGLE,
    label: str | None = None,
) -> tuple[Method, Optimization]:
    """Instantiate a method class with its own optimizer state (``label`` names it in errors; default: the class).

    A method that backpropagates through the reward (``capabilities.needs_differentiable_reward``) is
    handed the training reward, which must be differentiable; every other method only sees the loop's
    scores. With several processes the optimizer averages gradients over them before each step (under
    FSDP the backward pass does, and a parameter left without a gradient steps on zeros in both cases).
    """
    name = label or method_cls.__name__
    config_cls: Any = method_cls.Config  # (typed as a bare type, isinstance would narrow method_cfg to object)
    if not isinstance(method_cfg, config_cls):
        raise TypeError(f"method {name!r} takes a {config_cls.__name__}, got {type(method_cfg).__name__}")
    sync = processes.average_gradients if processes.world_size > 1 else None
    if processes.fsdp:  # the backward averages; a step that no process ran a backward for still steps, as above
        sync = zero_missing_gradients
    optim = Optimization(  # loss checks once per step: no host sync per pass
        policy.trainable_parameters(), optim_cfg, gradient_sync=sync, defer_loss_checks=True,
        **method_ema_settings(method_cfg),
    )  # fmt: skip
    if not method_cls.capabilities.needs_differentiable_reward:
        return method_cls(method_cfg, policy, optim), optim
    if reward is None or not reward.spec.differentiable:
        what = "no reward" if reward is None else f"reward {reward.spec.name!r}, which is not differentiable"
        raise ValueError(
            f"method {name!r} backpropagates through the reward but was given {what}; "
            "train it with a differentiable reward (diffrl list rewards; e.g. shapes_classifier)"
        )
    with_reward: Any = method_cls  # the Method protocol's __init__ has no reward argument
    return with_reward(method_cfg, policy, optim, reward), optim


EvalCallback = Callable[[dict[str, float], EvalOutput | None], None]


def check_fsdp(method_cls: type[Method], label: str | None = None) -> None:
    """Refuse, before any compute, a method whose passes per process may differ under FSDP (``capabilities.fsdp``)."""
    if not method_cls.capabilities.fsdp:
        raise ValueError(
            f"method {label or method_cls.__name__!r} is not supported under FSDP (its capabilities.fsdp is False): "
            "FSDP needs the same passes on every process and the method has not been checked for it; launch it "
            "data-parallel (harness/launch/8gpu.yaml) instead"
        )


def check_geometry(
    method_cls: type[Method], reward: Reward, loop: LoopConfig, processes: Processes, label: str | None = None
) -> slice:
    """This process's share of an iteration's samples, after checking the batch splits (before any compute)."""
    n = loop.prompts_per_iteration * loop.images_per_prompt
    share = processes.shard(n, "samples (prompts_per_iteration × images_per_prompt)")
    if processes.world_size == 1:
        return share
    per_process = n // processes.world_size
    name = label or method_cls.__name__
    if method_cls.capabilities.needs_whole_groups and per_process % loop.images_per_prompt:
        raise ValueError(
            f"method {name!r} needs each prompt's images on one process, but {per_process} samples per "
            f"process split groups of images_per_prompt={loop.images_per_prompt}; make the per-process share "
            "a multiple of images_per_prompt"
        )
    if processes.fsdp:
        check_fsdp(method_cls, name)
    state = reward.state_dict() if hasattr(reward, "state_dict") else {}
    if state:
        raise ValueError(
            f"reward {reward.spec.name!r} keeps running statistics ({', '.join(state)}), which each process would "
            "update with its own scores; use normalize: none or fixed_range with several processes"
        )
    return share


def summed_ledger(ledger: Ledger, processes: Processes) -> Ledger:
    """The counters of every process: passes and images summed, seconds the slowest process's (wall clock)."""
    if processes.world_size == 1:
        return ledger
    counts = processes.sum([float(c[p]) for c in (ledger.forward, ledger.backward, ledger.images) for p in PHASES])
    seconds = processes.max([ledger.seconds[p] for p in PHASES])
    k = len(PHASES)
    return Ledger(
        forward={p: int(counts[i]) for i, p in enumerate(PHASES)},
        backward={p: int(counts[k + i]) for i, p in enumerate(PHASES)},
        images={p: int(counts[2 * k + i]) for i, p in enumerate(PHASES)},
        seconds=dict(zip(PHASES, seconds, strict=True)),
        flops_per_forward=ledger.flops_per_forward,
    )


@dataclass(frozen=True, kw_only=True)
class _Hooks:
    """What a caller of :func:`train` plugs in: callbacks, the checkpoint, and the known base scores."""

    on_eval: EvalCallback | None = None
    on_iteration: Callable[[dict[str, float]], None] | None = None
    checkpoint: Path | None = None
    fingerprint: str = ""
    initial_scores: dict[str, float] | None = None


@dataclass
class _Run:
    """One call of :func:`train`: the objects built once, the loop's state and its clock, and its steps.

    Every random draw happens in the same order as in one straight loop: the prompt generator, then
    each iteration's ``collect`` and ``update`` generators from ``(seed, role, iteration)``.
    """

    loop: LoopConfig
    method: Method
    optim: Optimization
    policy: Policy  # the raw policy, whose weight sets checkpoints hold
    counted: CountingPolicy  # the same policy behind the compute meter
    ledger: Ledger
    benchmark: Benchmark
    reward: Reward
    processes: Processes
    hooks: _Hooks
    reuse_base: bool  # the main process reuses initial_scores for iteration 0 (no eval passes anywhere)
    eval_sampler: Sampler
    prompt_rng: np.random.Generator
    state: LoopState = field(default_factory=LoopState)
    totals: Ledger = field(default_factory=Ledger)  # every process's counters: what budgets and rows read
    started: float = 0.0

    def elapsed(self) -> float:
        return self.state.elapsed + time.perf_counter() - self.started

    def resume(self, label: str) -> None:
        """Load the checkpoint if there is one, then start the clock."""
        checkpoint = self.hooks.checkpoint
        if checkpoint is not None and checkpoint.exists():
            self.state = load_checkpoint(checkpoint, self.policy, self.optim, self.ledger, self.prompt_rng,
                                         self.method, self.hooks.fingerprint, self.reward)  # fmt: skip
            log.info("resumed %s from %s at iteration %d", label, checkpoint, self.state.iteration)
        self.totals = summed_ledger(self.ledger, self.processes)
        self.started = time.perf_counter()

    def save(self) -> None:
        """Checkpoint (with a path); under FSDP every process gathers the shards and the main one writes."""
        checkpoint, processes = self.hooks.checkpoint, self.processes
        if checkpoint is not None and (processes.is_main or processes.fsdp):
            saved_elapsed, self.state.elapsed = self.state.elapsed, self.elapsed()
            save_checkpoint(checkpoint, self.state, self.policy, self.optim, self.ledger, self.prompt_rng, self.method,
                            self.hooks.fingerprint, self.reward, write=processes.is_main)  # fmt: skip
            self.state.elapsed = saved_elapsed

    def evaluate(self, iteration: int, point: int | None) -> None:
        """Evaluate the EMA weights (or reuse the base scores at iteration 0); the main process records the row."""
        output: EvalOutput | None = None
        if iteration == 0 and self.reuse_base:
            if not self.processes.is_main:  # the main process reuses the base scores: no passes to join
                return
            if self.hooks.initial_scores is None:
                raise RuntimeError("initial_scores were given to another process but not to the main one")
            scores, counters = self.hooks.initial_scores, self.totals
        else:
            with self.ledger.phase("eval"), self.optim.ema.applied():
                output = evaluate_policy(self.counted, self.benchmark, self.eval_sampler, self.loop.eval,
                                         progress=False, processes=self.processes)  # fmt: skip
            scores, counters = output.scores, summed_ledger(self.ledger, self.processes)  # every process's share
            if not self.processes.is_main:  # the others only sampled their share
                return
        row = self._eval_row(iteration, point, scores, counters)
        self.state.evaluations.append(row)
        log.info("eval @%d: overall %.3f", iteration, scores["overall"])
        if self.hooks.on_eval is not None:
            self.hooks.on_eval(row, output)

    def _eval_row(
        self, iteration: int, point: int | None, scores: dict[str, float], counters: Ledger
    ) -> dict[str, Any]:
        row: dict[str, Any] = {
            "seed": self.loop.seed,
            "iteration": iteration,
            "optimizer_steps": self.optim.global_step,
        }
        budget = self.loop.budget
        if budget is not None:  # eval point k ≥ 1 is the k-th budget fraction; 0 the untrained model
            if iteration == 0:
                row["eval_point"], row["budget/fraction"] = 0, 0.0
            elif point is not None:
                row["eval_point"], row["budget/fraction"] = point + 1, budget.fractions[point]
            else:  # an eval_every evaluation between budget points
                row["eval_point"], row["budget/fraction"] = None, None
        return row | {
            **counters.snapshot(),
            "time/elapsed": round(self.elapsed(), 3),
            **{f"eval/{k}": v for k, v in scores.items()},
        }

    def most_over_processes(self, n: int) -> int:
        """FSDP: every process runs the most micro-batches any one has."""
        return int(self.processes.max([n])[0])

    def iterate(self, iteration: int, share: slice, batch_index: torch.Tensor) -> dict[str, Any]:
        """One iteration: collect, decode, score, gather the rewards, update; returns its log row.

        Everything runs on the policy's device; the scores come back on the host (the reward checks them there)
        and go to the device once. Each phase ends by waiting for its queued work, so its time is its own.
        """
        loop, ledger, processes, device = self.loop, self.ledger, self.processes, self.counted.device
        seconds_before_iteration = dict(ledger.seconds)
        prompts = self.benchmark.train_prompts(loop.prompts_per_iteration, self.prompt_rng)
        expanded = [p for p in prompts for _ in range(loop.images_per_prompt)]
        group_ids = torch.arange(len(prompts), device=device).repeat_interleave(loop.images_per_prompt)
        rank_keys = processes.seed_keys  # distinct sampling and training noise per process
        with ledger.phase("sampling"):
            rollout = self.method.collect(
                expanded[share], group_ids[share], generator(loop.seed, "collect", iteration, *rank_keys)
            )
            images = self.counted.decode(rollout.x0)
            synchronize(device)
        with ledger.phase("reward"), torch.no_grad():  # scores only; reward-backprop methods re-score in update
            scores = check_scores(self.reward.spec.name, self.reward(images, expanded[share]), len(batch_index))
            scores = processes.gather(scores)  # the whole batch's, for per-prompt statistics
        if processes.world_size > 1:
            rollout = dataclasses.replace(rollout, batch_group_ids=group_ids, batch_index=batch_index,
                                          equal_passes=self.most_over_processes if processes.fsdp else None)  # fmt: skip
        with ledger.phase("training"):
            rewards = to_device(scores, device)
            logs = self.method.update(rollout, rewards, generator(loop.seed, "update", iteration, *rank_keys))
            synchronize(device)
        self.totals = summed_ledger(ledger, processes)
        return {"iteration": iteration, "train/reward_mean": scores.mean().item(),
                "train/reward_std": scores.std().item(), **logs, "compute/fwd_equiv": self.totals.fwd_equiv,
                "time/elapsed": round(self.elapsed(), 3),
                **{f"time/{p}_seconds": round(ledger.seconds[p] - seconds_before_iteration[p], 4)
                   for p in ("sampling", "reward", "training")}}  # fmt: skip

    def finished(self, iteration: int) -> bool:
        budget = self.loop.budget
        return iteration >= self.loop.iterations or (budget is not None and budget.done(self.totals, iteration))

    def reached_point(self, iteration: int) -> int | None:
        """The last budget eval point this iteration reached (None: none), advancing the next one."""
        budget, point = self.loop.budget, None
        if budget is None:
            return None
        points = [f * budget.amount for f in budget.fractions]
        while self.state.next_eval_point < len(points):
            if budget.spent(self.totals, iteration) < points[self.state.next_eval_point]:
                break
            point, self.state.next_eval_point = self.state.next_eval_point, self.state.next_eval_point + 1
        return point

    def run(self, share: slice, progress: bool, label: str) -> None:
        """Iterate until the iteration cap or the budget is reached, evaluating and saving on schedule."""
        loop, state, budget = self.loop, self.state, self.loop.budget
        bar = tqdm(
            total=budget.amount if budget else loop.iterations,
            initial=budget.spent(self.totals, state.iteration) if budget else state.iteration,
            desc=label, unit=budget.unit if budget else "it", disable=not progress or not self.processes.is_main,
            dynamic_ncols=True,
        )  # fmt: skip
        finished = self.finished(state.iteration)
        samples = loop.prompts_per_iteration * loop.images_per_prompt
        batch_index = torch.arange(samples, device=self.counted.device)[share]
        while not finished:
            iteration = state.iteration + 1
            row = self.iterate(iteration, share, batch_index)
            state.iterations.append(row)
            state.iteration = iteration
            if self.hooks.on_iteration is not None and self.processes.is_main:
                self.hooks.on_iteration(row)
            bar.update((budget.spent(self.totals, iteration) if budget else iteration) - bar.n)
            bar.set_postfix(reward=f"{row['train/reward_mean']:.3f}")
            finished = self.finished(iteration)
            point = self.reached_point(iteration)
            due = finished or point is not None or (loop.eval_every and iteration % loop.eval_every == 0)
            if due and loop.evaluate:
                self.evaluate(iteration, point)
                self.save()
            elif finished or iteration % loop.checkpoint_every == 0:
                self.save()
        bar.close()


def train(
    method_cls: type[Method],
    method_cfg: Any,
    policy: Policy,
    benchmark: Benchmark,
    reward: Reward,
    loop: LoopConfig,
    optim_cfg: OptimConfig,
    *,
    progress: bool = True,
    label: str | None = None,
    on_eval: EvalCallback | None = None,
    on_iteration: Callable[[dict[str, float]], None] | None = None,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    initial_scores: dict[str, float] | None = None,
    processes: Processes = SINGLE,
) -> TrainResult:
    """Train ``method_cls`` on ``benchmark`` prompts with ``reward``; evaluate EMA weights on schedule.

    ``label`` names the run in logs, progress bars and errors (default: the class name).
    ``checkpoint``: save the run there and resume from it if it exists (``fingerprint`` must match
    the one it was written with). ``initial_scores``: the eval scores of the untrained model when
    already known (they do not depend on the method or the seed), so iteration 0 is not re-sampled.
    ``on_eval`` receives each evaluation row and its images (None for ``initial_scores``).
    ``processes``: this process's place in a data-parallel launch (every process samples its share of
    each evaluation; scoring, callbacks and checkpoint writes happen on the main process). Under FSDP
    ``policy`` is sharded in place.
    """
    label = label or method_cls.__name__
    share = check_geometry(method_cls, reward, loop, processes, label)
    hooks = _Hooks(
        on_eval=on_eval,
        on_iteration=on_iteration,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        initial_scores=initial_scores,
    )
    reuse_base = initial_scores is not None
    if processes.fsdp:
        shard_policy(policy, processes.device, processes.world_size, processes.reshard_after_forward)
    if processes.world_size > 1:  # only the main process learns the base scores (on_eval): all follow it
        reuse_base = processes.max([float(reuse_base)])[0] > 0
    torch.manual_seed(loop.seed)
    ledger = Ledger()
    counted = CountingPolicy(policy, ledger)
    method, optim = build_method(method_cls, method_cfg, counted, optim_cfg, reward, processes, label)
    run = _Run(loop=loop, method=method, optim=optim, policy=policy, counted=counted, ledger=ledger,
               benchmark=benchmark, reward=reward, processes=processes, hooks=hooks, reuse_base=reuse_base,
               eval_sampler=make_sampler(loop.eval_sampler), prompt_rng=numpy_rng(loop.seed, "train-prompts"))  # fmt: skip
    run.resume(label)
    resumed_from, seconds_before = run.state.iteration, dict(ledger.seconds)
    if run.state.iteration == 0 and not run.state.evaluations and loop.evaluate:
        run.evaluate(0, None)
        run.save()
    run.run(share, progress, label)
    session = {phase: ledger.seconds[phase] - seconds_before[phase] for phase in ledger.seconds}
    return TrainResult(run.state.iterations, run.state.evaluations, ledger, resumed_from, session)
