"""``diffrl run SUITE``: every (variant, seed) cell of a suite through the shared loop, resumably.

Layout of ``results/<suite>/``::

    suite.yaml            the resolved config (every default filled in)
    metadata.json         git commit, config hash, package versions, device, cell status
    timing.json           wall time split into the methods' work, evaluation and harness overhead, summed
                          over every invocation of the run (a resume adds one), each listed under invocations
    base_evals.json       eval scores of the untrained model per eval protocol (shared by all cells)
    base_eval_prompts.json  its per-prompt scores, likewise
    results.csv/.parquet  the tidy table: one row per evaluation
    eval_prompts.parquet  each evaluation's per-prompt scores (eval-sampling errors, paired differences)
    cells/<variant>/seed<k>/
        status.json       running | done | failed (with the error)
        evals.jsonl       evaluation rows, iterations.jsonl: training logs
        eval_prompts.jsonl  per-prompt scores of each evaluation (harness.evaluate.PromptScores)
        checkpoint.pt     the latest resumable state
        lora/, lora_ema/  SD3/FLUX: θ's LoRA and its EMA as diffusers LoRA folders (load_lora_weights reads them)
    samples/              eval sample grids per cell and eval point

A finished cell is never rerun; an unfinished one resumes from its checkpoint; a failed one is
recorded with its error while the other cells go on, and is retried by the next run.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from benchmarks.base import Benchmark
from harness.atomic import atomic_write, atomic_write_json, atomic_write_jsonl, atomic_write_text
from harness.budget import UNIT_COLUMNS
from harness.config import call_checked
from harness.distributed import SINGLE, Processes
from harness.evaluate import PROMPT_SCORES_FILE, EvalOutput, prompt_scores_frame
from harness.images import save_grid
from harness.policies.lora import PIPELINES, export_run_loras
from harness.policy import Policy
from harness.store import device_info, environment, git_commit, package_versions, results_frame, write_results
from harness.suite import MethodEntry, Suite, config_digest, make_benchmark
from harness.suite_model import ModelSpec, resolve_device
from harness.trackers import CellTrackers
from harness.trainer import LoopConfig, check_fsdp, train
from harness.types import Prompt, Reward
from methods import METHODS
from rewards.base import WeightedReward
from rewards.normalize import FixedRange, Normalizer, RunningMeanStd

log = logging.getLogger(__name__)


@dataclass
class CellOutcome:
    label: str
    seed: int
    status: str  # done | failed
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass
class SuiteOutcome:
    out: Path
    cells: list[CellOutcome]

    @property
    def failed(self) -> list[CellOutcome]:
        return [c for c in self.cells if c.status == "failed"]


def build_benchmark(suite: Suite) -> Benchmark:
    benchmark: Benchmark = make_benchmark(suite.config.benchmark)
    return benchmark


def build_reward(suite: Suite, label: str | None = None) -> Reward:
    """The training reward of variant ``label`` (its own ``rewards``, else the suite's): the registered
    reward itself, or a weighted sum of (optionally normalised) rewards."""
    from rewards import REWARDS

    own = next((m.rewards for m in suite.config.methods if m.label == label), None)
    terms = own if own is not None else suite.config.rewards
    rewards = {key: call_checked(REWARDS.get(key), t.options, f"rewards.{key}.options") for key, t in terms.items()}
    normalizers: dict[str, Normalizer] = {}
    for key, term in terms.items():
        if term.normalize == "fixed_range" and term.range is not None:
            normalizers[key] = FixedRange(*term.range)
        elif term.normalize == "running":
            normalizers[key] = RunningMeanStd()
    if len(rewards) == 1 and next(iter(terms.values())).weight == 1.0 and not normalizers:
        return next(iter(rewards.values()))
    return WeightedReward(rewards, {key: t.weight for key, t in terms.items()}, normalizers=normalizers)


def load_policy(suite: Suite, processes: Processes = SINGLE) -> Policy:
    """The model of ``suite`` with fresh trainable weights: the tiny DiT, or SD3 / FLUX with new LoRA adapters.

    Under a multi-GPU launch each process puts the model on its own GPU (under FSDP ``train`` then shards it).
    """
    return load_model(suite.config.model, suite.model_config, processes)


def load_model(model: ModelSpec, model_config: Any, processes: Processes = SINGLE) -> Policy:
    """:func:`load_policy` from a checked ``model`` section and its policy config (``check_model``'s pair)."""
    device = resolve_device(model.device)
    if processes.world_size > 1 and device.startswith("cuda"):
        device = str(processes.device)
    if model.kind in ("sd3", "flux"):
        if model.kind == "flux":
            from harness.policies import flux

            # validation filled in the checkpoint: a folder or a hub id
            return flux.FluxPolicy.from_pretrained(model.checkpoint or flux.DEFAULT_MODEL, model_config, device=device)
        from harness.policies import sd3

        return sd3.SD3Policy.from_pretrained(model.checkpoint or sd3.DEFAULT_MODEL, model_config, device=device)
    from benchmarks.shapes.checkpoint import load_shapes_policy

    return load_shapes_policy(Path(model.checkpoint) if model.checkpoint else None).to(device)


def cell_dir(out: Path, label: str, seed: int) -> Path:
    return out / "cells" / label / f"seed{seed}"


def read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


class SuiteRunner:
    """Runs the cells of one suite into one folder; see the module docstring."""

    def __init__(self, suite: Suite, out: Path, *, progress: bool = True, processes: Processes = SINGLE) -> None:
        """``processes``: a data-parallel launch runs every cell on all processes; only the main one writes."""
        self.suite, self.out, self.progress, self.processes = suite, out, progress, processes
        self.main = processes.is_main
        self.cfg = suite.config
        self.benchmark = build_benchmark(suite)
        self.base_evals: dict[str, dict[str, float]] = read_json(out / "base_evals.json", {})
        self.base_prompts: dict[str, dict[str, Any]] = read_json(out / "base_eval_prompts.json", {})
        self.session = {"eval": 0.0, "sampling": 0.0, "reward": 0.0, "training": 0.0}
        self.git: dict[str, Any] = {}

    def run(self) -> SuiteOutcome:
        started = time.perf_counter()
        self.git = git_commit()  # the code that runs, read before it runs (a commit made meanwhile is not it)
        cells = [(entry.label, seed) for entry in self.cfg.methods for seed in self.cfg.seeds]
        self._check_earlier_runs(cells)
        if self.processes.fsdp:  # every variant, before the first cell computes anything
            for entry in self.cfg.methods:
                check_fsdp(METHODS.get(entry.method), entry.label)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "suite.yaml", yaml.safe_dump(self.suite.resolved(), sort_keys=False))
        outcomes = []
        for index, (label, seed) in enumerate(cells, 1):
            if self.main:
                tqdm.write(f"[{index}/{len(cells)}] {label} seed {seed}")
            outcomes.append(self.run_cell(label, seed))
        if not self.main:
            return SuiteOutcome(self.out, outcomes)
        rows = [
            {"suite": self.cfg.name, "method": self._entry(o.label).method, "variant": o.label, **row}
            for o in outcomes
            if o.status == "done"
            for row in o.evaluations
        ]
        if rows:
            write_results(results_frame(rows), self.out)
            self._write_prompt_scores(outcomes)
        self._write_metadata(outcomes)
        self._write_timing(time.perf_counter() - started)
        return SuiteOutcome(self.out, outcomes)

    def _check_earlier_runs(self, cells: list[tuple[str, int]]) -> None:
        """Refuse, before any compute, to resume cells that another configuration wrote."""
        stale = []
        for label, seed in cells:
            status = read_json(cell_dir(self.out, label, seed) / "status.json", {})
            if status and status.get("fingerprint") != self.suite.cell_fingerprint(label, seed):
                stale.append(str(cell_dir(self.out, label, seed)))
        if stale:
            raise RuntimeError(
                f"{len(stale)} cell folder(s) hold runs of another configuration of this suite ({', '.join(stale)}); "
                "delete them, or write the suite to another folder with --out"
            )

    def _entry(self, label: str) -> MethodEntry:
        return next(m for m in self.cfg.methods if m.label == label)

    def run_cell(self, label: str, seed: int) -> CellOutcome:
        folder = cell_dir(self.out, label, seed)
        status = read_json(folder / "status.json", {})
        fingerprint = self.suite.cell_fingerprint(label, seed)
        if status.get("status") == "done" and status.get("fingerprint") == fingerprint:
            if self.main:
                tqdm.write(f"  done earlier: {len(read_jsonl(folder / 'evals.jsonl'))} evaluations kept")
            return CellOutcome(label, seed, "done", read_jsonl(folder / "evals.jsonl"))
        if self.main:
            atomic_write_json(folder / "status.json", {"status": "running", "fingerprint": fingerprint})
        trackers = CellTrackers(
            self.cfg.trackers if self.main else (), f"{self.cfg.name}/{label}/seed{seed}", self.out / "trackers",
            self.suite.resolved(),
        )  # fmt: skip
        try:
            evaluations = self._train_cell(label, seed, folder, fingerprint, trackers)
        except Exception as error:  # a failed cell is recorded; the other cells go on
            message = f"{type(error).__name__}: {error}"
            if self.main:
                tqdm.write(f"  FAILED {label} seed {seed}: {message}")
                atomic_write_json(folder / "status.json", {"status": "failed", "fingerprint": fingerprint,
                                                           "error": message, "traceback": traceback.format_exc()})  # fmt: skip
            if self.processes.world_size > 1:
                raise  # the other processes cannot go on alone: their next collective would wait forever
            return CellOutcome(label, seed, "failed", error=message)
        finally:
            trackers.finish()
        if self.main:
            atomic_write_json(folder / "status.json", {"status": "done", "fingerprint": fingerprint})
        return CellOutcome(label, seed, "done", evaluations)

    def _train_cell(self, label: str, seed: int, folder: Path, fingerprint: str, trackers: CellTrackers) -> list[dict]:
        entry = self._entry(label)
        settings = self.suite.eval_settings(label)
        base_key = config_digest([self.cfg.benchmark, self.cfg.model, self.cfg.eval, settings])
        train_spec = self.cfg.train
        loop = LoopConfig(
            iterations=train_spec.max_iterations, budget=self.cfg.budget, seed=seed,
            prompts_per_iteration=train_spec.prompts_per_iteration, images_per_prompt=train_spec.images_per_prompt,
            eval_sampler=self.cfg.eval.sampler, eval=settings, checkpoint_every=train_spec.checkpoint_every,
        )  # fmt: skip
        evaluations = read_jsonl(folder / "evals.jsonl")
        reward = build_reward(self.suite, label)  # per cell: running normalizers must not carry over between cells

        def on_eval(row: dict[str, Any], output: EvalOutput | None) -> None:
            if row["iteration"] == 0 and output is not None:
                self.base_evals[base_key] = {k[5:]: v for k, v in row.items() if k.startswith("eval/")}
                atomic_write_json(self.out / "base_evals.json", self.base_evals)
            kept = [r for r in evaluations if r["iteration"] < row["iteration"]]  # a resumed run re-evaluates
            evaluations[:] = [*kept, row]
            atomic_write_jsonl(folder / "evals.jsonl", evaluations)
            self._record_prompt_scores(folder, base_key, row, output)
            if output is not None and self.cfg.eval.grids:
                grid = self._save_grid(output, label, seed, row["eval_point"], settings.guidance_scale)
                if grid is not None:
                    trackers.log_image("eval/samples", grid, step=row["iteration"])
            trackers.log(row, step=row["iteration"])
            tqdm.write("  " + self._summary(row))

        result = train(
            METHODS.get(entry.method), self.suite.method_configs[label], load_policy(self.suite, self.processes),
            self.benchmark, reward, loop, train_spec.optim, progress=self.progress, label=f"{label} s{seed}", on_eval=on_eval,
            on_iteration=lambda row: trackers.log(row, step=int(row["iteration"])),
            checkpoint=folder / "checkpoint.pt", fingerprint=fingerprint, initial_scores=self.base_evals.get(base_key),
            processes=self.processes,
        )  # fmt: skip
        for phase in self.session:
            self.session[phase] += result.session_seconds[phase]
        if self.main:
            atomic_write_jsonl(folder / "iterations.jsonl", result.iterations)
            atomic_write_jsonl(folder / "evals.jsonl", result.evaluations)
            if self.cfg.model.kind in PIPELINES:  # θ and its EMA as LoRA folders any diffusers user can load
                export_run_loras(folder / "checkpoint.pt", folder, self.cfg.model.kind, self.suite.model_config.lora)
        return result.evaluations

    def _record_prompt_scores(
        self, folder: Path, base_key: str, row: dict[str, Any], output: EvalOutput | None
    ) -> None:
        """Append this evaluation's per-prompt scores to the cell's ``eval_prompts.jsonl`` (the untrained
        model's come from ``base_eval_prompts.json`` when its scores were reused)."""
        iteration = row["iteration"]
        record = output.per_prompt.to_json() if output is not None and output.per_prompt is not None else None
        if iteration == 0 and record is not None:
            self.base_prompts[base_key] = record
            atomic_write_json(self.out / "base_eval_prompts.json", self.base_prompts)
        elif iteration == 0:
            record = self.base_prompts.get(base_key)  # absent in folders written before per-prompt scores
        if record is None:
            return
        path = folder / "eval_prompts.jsonl"
        kept = [r for r in read_jsonl(path) if r["iteration"] < iteration]  # a resumed run re-evaluates
        atomic_write_jsonl(path, [*kept, {"iteration": iteration, "eval_point": row.get("eval_point"), **record}])

    def _write_prompt_scores(self, outcomes: list[CellOutcome]) -> None:
        """``eval_prompts.parquet``: every finished cell's per-prompt scores at its recorded evaluations."""
        records = []
        for o in outcomes:
            if o.status != "done":
                continue
            iterations = {row["iteration"] for row in o.evaluations}
            for record in read_jsonl(cell_dir(self.out, o.label, o.seed) / "eval_prompts.jsonl"):
                if record["iteration"] in iterations:
                    records.append({"variant": o.label, "seed": o.seed, **record})
        if records:
            frame = prompt_scores_frame(records)
            atomic_write(self.out / PROMPT_SCORES_FILE, lambda f: frame.to_parquet(f, index=False))

    def _summary(self, row: dict[str, Any]) -> str:
        """One line per evaluation: where in the budget, and the metrics."""
        budget = self.cfg.budget
        spent = row.get(UNIT_COLUMNS[budget.unit], row["iteration"])
        metrics = " ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("eval/"))
        fraction = row.get("budget/fraction")
        where = f"{fraction:.0%}" if fraction is not None else "off-schedule"
        return f"eval @ iteration {row['iteration']} ({budget.unit} {spent:,.0f}, {where} of budget): {metrics}"

    def _save_grid(self, output: EvalOutput, label: str, seed: int, point: int | None, scale: float) -> Path | None:
        """Columns: tasks; rows: the first image of each task's first ``eval.grids`` prompts. Returns the file."""
        assert output.images is not None  # on_eval runs on the main process, which holds the images
        picks = grid_indices(output.prompts, self.cfg.eval.grids, self.benchmark.images_per_prompt)
        columns = len({p.tag for p in output.prompts})
        if point == 0:  # the untrained model: one grid per eval protocol
            return save_grid(output.images[picks], self.out / "samples" / f"base_cfg{scale:g}.png", columns=columns)
        if point is not None:
            path = self.out / "samples" / f"{label}_seed{seed}_point{point}.png"
            return save_grid(output.images[picks], path, columns=columns)
        return None

    def _write_metadata(self, outcomes: list[CellOutcome]) -> None:
        atomic_write_json(
            self.out / "metadata.json",
            {
                "suite": self.cfg.name,
                "source": self.suite.source,
                "config_hash": self.suite.config_hash(),
                "git": self.git,
                "packages": package_versions(),
                "environment": environment(),
                "device": device_info(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "cells": [{"variant": o.label, "seed": o.seed, "status": o.status, "error": o.error} for o in outcomes],
            },
        )

    def _write_timing(self, wall: float) -> None:
        """Wall time split into the methods' work, evaluation and everything else: this invocation's is appended
        to ``invocations`` and the top-level numbers are the sums over all of them (the whole run)."""
        now = timing_entry(wall, self.session["eval"], {p: self.session[p] for p in ("sampling", "reward", "training")})
        atomic_write_json(self.out / "timing.json", cumulative_timing(read_json(self.out / "timing.json"), now))


def timing_entry(wall: float, eval_seconds: float, method: dict[str, float]) -> dict[str, Any]:
    """One invocation's (or a sum's) wall time: the methods' phases, evaluation and the harness's remainder."""
    harness = wall - sum(method.values()) - eval_seconds
    return {
        "wall_seconds": round(wall, 2),
        "method_seconds": {phase: round(seconds, 2) for phase, seconds in method.items()},
        "eval_seconds": round(eval_seconds, 2),
        "harness_seconds": round(harness, 2),
        "harness_fraction": round(harness / wall, 4) if wall > 0 else None,
        "torch_threads": torch.get_num_threads(),
    }


def cumulative_timing(previous: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, Any]:
    """``timing.json`` after one more invocation: ``invocations`` (earlier ones, then ``now``) and their sums.

    A file from before invocations were listed counts as one earlier invocation.
    """
    earlier = [] if not previous else previous.get("invocations", [previous])
    invocations = [*earlier, {**now, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
    method = {p: sum(i["method_seconds"].get(p, 0.0) for i in invocations) for p in now["method_seconds"]}
    total = timing_entry(sum(i["wall_seconds"] for i in invocations), sum(i["eval_seconds"] for i in invocations),
                         method)  # fmt: skip
    return {**total, "torch_threads": now["torch_threads"], "invocations": invocations}


def grid_indices(prompts: Sequence[Prompt], per_task: int, images_per_prompt: int) -> list[int]:
    """The first image of each task's first ``per_task`` eval prompts: row r holds every task's r-th prompt."""
    by_task: dict[str, list[int]] = {}
    for index in range(0, len(prompts), images_per_prompt):
        by_task.setdefault(prompts[index].tag, []).append(index)
    return [indices[r] for r in range(per_task) for indices in by_task.values() if r < len(indices)]


def run_suite(suite: Suite, out: Path, *, progress: bool = True, processes: Processes = SINGLE) -> SuiteOutcome:
    """Run (or resume) every cell of ``suite`` into ``out`` (with ``processes``: every process of a launch calls this)."""
    return SuiteRunner(suite, out, progress=progress, processes=processes).run()
