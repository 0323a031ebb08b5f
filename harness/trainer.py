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
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.base import Benchmark
from harness.budget import Budget
from harness.compute import PHASES, CountingPolicy, Ledger
from harness.distributed import SINGLE, Processes
from harness.evaluate import EvalOutput, EvalSettings, evaluate_policy
from harness.fsdp import check_method, shard_policy
from harness.optim import OptimConfig, Optimization
from harness.policy import Policy
from harness.resume import LoopState, load_checkpoint, save_checkpoint
from harness.samplers import make_sampler
from harness.seeding import generator, numpy_rng
from methods import METHODS
from rewards.base import Reward, check_scores

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
    name: str,
    method_cfg: Any,
    policy: Policy,
    optim_cfg: OptimConfig,
    reward: Reward | None = None,
    processes: Processes = SINGLE,
) -> tuple[Any, Optimization]:
    """Instantiate a registered method with its own optimizer state.

    A method that backpropagates through the reward (``needs_differentiable_reward``) is handed the
    training reward, which must be differentiable; every other method only sees the loop's scores.
    With several processes the optimizer averages gradients over them before each step (under FSDP the
    backward pass does).
    """
    method_cls = METHODS.get(name)
    if not isinstance(method_cfg, method_cls.Config):
        raise TypeError(f"method {name!r} takes a {method_cls.Config.__name__}, got {type(method_cfg).__name__}")
    sync = processes.average_gradients if processes.world_size > 1 and not processes.fsdp else None
    optim = Optimization(
        policy.trainable_parameters(), optim_cfg, ema_interval=method_cfg.ema_interval, gradient_sync=sync
    )
    if not getattr(method_cls, "needs_differentiable_reward", False):
        return method_cls(method_cfg, policy, optim), optim
    if reward is None or not reward.spec.differentiable:
        what = "no reward" if reward is None else f"reward {reward.spec.name!r}, which is not differentiable"
        raise ValueError(
            f"method {name!r} backpropagates through the reward but was given {what}; "
            "train it with a differentiable reward (diffrl list rewards; e.g. shapes_classifier)"
        )
    return method_cls(method_cfg, policy, optim, reward), optim


EvalCallback = Callable[[dict[str, float], EvalOutput | None], None]


def check_geometry(method_name: str, reward: Reward, loop: LoopConfig, processes: Processes) -> slice:
    """This process's share of an iteration's samples, after checking the batch splits (before any compute)."""
    n = loop.prompts_per_iteration * loop.images_per_prompt
    share = processes.shard(n, "samples (prompts_per_iteration × images_per_prompt)")
    if processes.world_size == 1:
        return share
    per_process = n // processes.world_size
    if getattr(METHODS.get(method_name), "needs_whole_groups", False) and per_process % loop.images_per_prompt:
        raise ValueError(
            f"method {method_name!r} needs each prompt's images on one process, but {per_process} samples per "
            f"process split groups of images_per_prompt={loop.images_per_prompt}; make the per-process share "
            "a multiple of images_per_prompt"
        )
    if processes.fsdp:
        check_method(method_name)
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


def train(
    method_name: str,
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
    """Train ``method_name`` on ``benchmark`` prompts with ``reward``; evaluate EMA weights on schedule.

    ``checkpoint``: save the run there and resume from it if it exists (``fingerprint`` must match
    the one it was written with). ``initial_scores``: the eval scores of the untrained model when
    already known (they do not depend on the method or the seed), so iteration 0 is not re-sampled.
    ``on_eval`` receives each evaluation row and its images (None for ``initial_scores``).
    ``processes``: this process's place in a data-parallel launch (every process samples its share of
    each evaluation; scoring, callbacks and checkpoint writes happen on the main process). Under FSDP
    ``policy`` is sharded in place.
    """
    share = check_geometry(method_name, reward, loop, processes)
    reuse_base = initial_scores is not None
    if processes.fsdp:
        shard_policy(policy, processes.device, processes.world_size, processes.reshard_after_forward)
    if processes.world_size > 1:  # only the main process learns the base scores (on_eval): all follow it
        reuse_base = processes.max([float(reuse_base)])[0] > 0
    torch.manual_seed(loop.seed)
    ledger = Ledger()
    counted = CountingPolicy(policy, ledger)
    method, optim = build_method(method_name, method_cfg, counted, optim_cfg, reward, processes)
    eval_sampler = make_sampler(loop.eval_sampler)
    prompt_rng = numpy_rng(loop.seed, "train-prompts")
    budget = loop.budget
    points = [f * budget.amount for f in budget.fractions] if budget else []
    state = LoopState()
    if checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint, policy, optim, ledger, prompt_rng, method, fingerprint, reward)
        log.info("resumed %s from %s at iteration %d", label or method_name, checkpoint, state.iteration)
    resumed_from, seconds_before = state.iteration, dict(ledger.seconds)
    totals = summed_ledger(ledger, processes)  # every process's counters: what budgets and rows read
    started = time.perf_counter()

    def elapsed() -> float:
        return state.elapsed + time.perf_counter() - started

    def save() -> None:  # under FSDP every process gathers the shards; the main one writes
        if checkpoint is not None and (processes.is_main or processes.fsdp):
            saved_elapsed, state.elapsed = state.elapsed, elapsed()
            save_checkpoint(checkpoint, state, policy, optim, ledger, prompt_rng, method, fingerprint, reward,
                            write=processes.is_main)  # fmt: skip
            state.elapsed = saved_elapsed

    def evaluate(iteration: int, point: int | None) -> None:
        output: EvalOutput | None = None
        if iteration == 0 and reuse_base:
            if not processes.is_main:  # the main process reuses the base scores: no passes to join
                return
            if initial_scores is None:
                raise RuntimeError("initial_scores were given to another process but not to the main one")
            scores, counters = initial_scores, totals
        else:
            with ledger.phase("eval"), optim.ema.applied():
                output = evaluate_policy(
                    counted, benchmark, eval_sampler, loop.eval, progress=False, processes=processes
                )
            scores, counters = output.scores, summed_ledger(ledger, processes)  # every process's eval share
            if not processes.is_main:  # the others only sampled their share
                return
        row: dict[str, Any] = {"seed": loop.seed, "iteration": iteration, "optimizer_steps": optim.global_step}
        if budget is not None:  # eval point k ≥ 1 is the k-th budget fraction; 0 the untrained model
            if iteration == 0:
                row["eval_point"], row["budget/fraction"] = 0, 0.0
            elif point is not None:
                row["eval_point"], row["budget/fraction"] = point + 1, budget.fractions[point]
            else:  # an eval_every evaluation between budget points
                row["eval_point"], row["budget/fraction"] = None, None
        row |= {
            **counters.snapshot(),
            "time/elapsed": round(elapsed(), 3),
            **{f"eval/{k}": v for k, v in scores.items()},
        }
        state.evaluations.append(row)
        log.info("eval @%d: overall %.3f", iteration, scores["overall"])
        if on_eval is not None:
            on_eval(row, output)

    if state.iteration == 0 and not state.evaluations and loop.evaluate:
        evaluate(0, None)
        save()
    bar = tqdm(
        total=budget.amount if budget else loop.iterations, initial=budget.spent(totals, state.iteration) if budget else state.iteration,
        desc=label or method_name, unit=budget.unit if budget else "it", disable=not progress or not processes.is_main,
        dynamic_ncols=True,
    )  # fmt: skip

    def most_over_processes(n: int) -> int:  # FSDP: every process runs the most micro-batches any one has
        return int(processes.max([n])[0])

    finished = state.iteration >= loop.iterations or (budget is not None and budget.done(totals, state.iteration))
    batch_index = torch.arange(loop.prompts_per_iteration * loop.images_per_prompt)[share]
    while not finished:
        iteration = state.iteration + 1
        seconds_before_iteration = dict(ledger.seconds)
        prompts = benchmark.train_prompts(loop.prompts_per_iteration, prompt_rng)
        expanded = [p for p in prompts for _ in range(loop.images_per_prompt)]
        group_ids = torch.arange(len(prompts)).repeat_interleave(loop.images_per_prompt)
        rank_keys = processes.seed_keys  # distinct sampling and training noise per process
        with ledger.phase("sampling"):
            rollout = method.collect(
                expanded[share], group_ids[share], generator(loop.seed, "collect", iteration, *rank_keys)
            )
            images = counted.decode(rollout.x0)
        with ledger.phase("reward"), torch.no_grad():  # scores only; reward-backprop methods re-score in update
            rewards = check_scores(reward.spec.name, reward(images, expanded[share]), len(batch_index))
            rewards = processes.gather(rewards)  # the whole batch's, for per-prompt statistics
        if processes.world_size > 1:
            rollout = dataclasses.replace(rollout, batch_group_ids=group_ids, batch_index=batch_index,
                                          equal_passes=most_over_processes if processes.fsdp else None)  # fmt: skip
        with ledger.phase("training"):
            logs = method.update(rollout, rewards, generator(loop.seed, "update", iteration, *rank_keys))
        totals = summed_ledger(ledger, processes)
        row = {"iteration": iteration, "train/reward_mean": rewards.mean().item(), "train/reward_std": rewards.std().item(),
               **logs, "compute/fwd_equiv": totals.fwd_equiv, "time/elapsed": round(elapsed(), 3),
               **{f"time/{p}_seconds": round(ledger.seconds[p] - seconds_before_iteration[p], 4)
                  for p in ("sampling", "reward", "training")}}  # fmt: skip
        state.iterations.append(row)
        state.iteration = iteration
        if on_iteration is not None and processes.is_main:
            on_iteration(row)
        bar.update((budget.spent(totals, iteration) if budget else iteration) - bar.n)
        bar.set_postfix(reward=f"{row['train/reward_mean']:.3f}")
        finished = iteration >= loop.iterations or (budget is not None and budget.done(totals, iteration))
        point = None  # the last budget eval point this iteration reached
        while budget is not None and state.next_eval_point < len(points):
            if budget.spent(totals, iteration) < points[state.next_eval_point]:
                break
            point, state.next_eval_point = state.next_eval_point, state.next_eval_point + 1
        due = finished or point is not None or (loop.eval_every and iteration % loop.eval_every == 0)
        if due and loop.evaluate:
            evaluate(iteration, point)
            save()
        elif finished or iteration % loop.checkpoint_every == 0:
            save()
    bar.close()
    session = {phase: ledger.seconds[phase] - seconds_before[phase] for phase in ledger.seconds}
    return TrainResult(state.iterations, state.evaluations, ledger, resumed_from, session)
