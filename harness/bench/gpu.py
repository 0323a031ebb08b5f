"""``diffrl bench gpu``: one prepared run that measures how close SD3.5 training gets to the card's limit.

One command, one model (SD3.5-Medium's transformer with random weights, 512 px → 64×64 latents, 77 + 128 = 205
text tokens, LoRA r 32 / α 64 as the suites train it; built by :mod:`harness.bench.sd3_check`), sections in order:

(a) **the limit**: a plain PyTorch loop, forward + backward of the transformer with θ's LoRA, at each micro-batch
    (default 4, 8, 16), eager; then each throughput option alone at the first micro-batch (gradient
    checkpointing, bf16 throughout, torch's attention kernels), with its peak memory; later the same loop with
    the blocks compiled (``harness.policies.throughput``);
(b) **the harness's training phase**: one DiffusionNFT and one FlowGRPO iteration per micro-batch through
    :func:`harness.trainer.train` with :class:`~harness.policies.sd3.SD3Policy` (16 images of 4 prompts, 4
    sampling steps, 2 training times per sample; FlowGRPO with CFG 4.5 trains ``micro_batch / 2`` prompts per
    call, so the transformer sees the same batch); with the blocks compiled at the largest micro-batch last;
(c) **sampling**: the same iterations' sampling phases (with and without the VAE decode);
(d) **the tiny DiT**: one ``shapes_full``-geometry cell through the suite's own loader with ``model.device``
    set to this device, seconds per iteration beside the 2-core CPU's figure in ``results/bench``; skipped with
    the validation's message where the suite refuses that device.

Rates are real FLOPs: ``FlopCounterMode`` around one eager forward and, apart, its ``.backward()`` per
micro-batch (the compiled runs do the same math; recomputation under checkpointing is not counted), and a
fraction of the card's dense bf16 peak where :data:`PEAK_BF16_TFLOPS` knows the card. Each section starts only
while ``--budget-seconds`` are left (the compiled ones need more), and the JSON and Markdown under ``--out`` are
rewritten after every section, so a run cut short keeps what it measured. ``--tiny`` runs every section on the
CPU with a tiny SD3 in seconds (compiled with dynamo's ``eager`` backend: tracing, no code generation).
:func:`sd35_cell_gpu_hours` turns the JSON into GPU-hours per ``sd35_geneval`` cell (``docs/sd3.md``, "Cost").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import harness.policies.throughput as throughput
from harness.bench.sd3_check import Brightness, FixedPrompts, build_sd3_policy, known_forward_flops, sync, versions
from harness.optim import OptimConfig
from harness.policies.sd3 import SD3LoRAConfig, SD3Policy, SD3PolicyConfig
from harness.trainer import LoopConfig, train
from methods.diffusion_nft import DiffusionNFT, DiffusionNFTConfig
from methods.flow_grpo import FlowGRPO, FlowGRPOConfig

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a part of torch.cuda.get_device_name; others: no fraction.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 80GB HBM3", 989.0), ("H100 SXM", 989.0), ("A100", 312.0),
)  # fmt: skip
METHODS: dict[str, Any] = {"diffusion_nft": DiffusionNFT, "flow_grpo": FlowGRPO}
# The bare loop's throughput options at the first micro-batch: the name, and whether it can run on the CPU.
OPTIONS: tuple[tuple[str, bool], ...] = (
    ("autocast (default)", True), ("gradient_checkpointing", True), ("bf16 throughout", True),
    ("attention _native_math", True), ("attention _native_flash", False), ("attention _native_efficient", False),
    ("attention _native_cudnn", False),
)  # fmt: skip
COMPILED_MIN_SECONDS = 150  # budget left that a compiled section needs to start (compilation takes minutes; tiny: 0)
# sd35_geneval (docs/sd3.md): 63.36 M forward-equivalents per cell; per iteration (1152 images) the sampling and
# training phases' forward-equivalents, and the transformer batch of a training call (train_batch_size 9; CFG ×2).
SD35_GENEVAL_BUDGET = 63_360_000
SD35_GENEVAL_ITERATION: dict[str, dict[str, int]] = {
    "diffusion_nft": {"sampling": 1152 * 10, "training": 1152 * 9 * (3 + 2), "micro_batch": 9},
    "flow_grpo": {"sampling": 1152 * 10 * 2, "training": 1152 * 9 * (2 + 2 + 2 * 2), "micro_batch": 18},
}


@dataclass(frozen=True)
class Geometry:
    """What one run measures: image size, text tokens, the iteration of (b) and the micro-batches."""

    resolution: int
    t5_tokens: int
    prompts: int
    images_per_prompt: int
    steps: int  # sampling steps of both methods
    train_times: int  # training times (DiffusionNFT) / transitions (FlowGRPO) per sample
    micro_batches: tuple[int, ...]
    repeats: int  # timed steps of the bare loop
    compile_all: bool = True  # the compiled plain loop at every micro-batch (False: the largest only)


GPU = Geometry(resolution=512, t5_tokens=128, prompts=4, images_per_prompt=4, steps=4, train_times=2,
               micro_batches=(4, 8, 16), repeats=3)  # fmt: skip
TINY = Geometry(resolution=32, t5_tokens=8, prompts=2, images_per_prompt=2, steps=2, train_times=1,
                micro_batches=(2, 4), repeats=1, compile_all=False)  # fmt: skip


def peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak from :data:`PEAK_BF16_TFLOPS`, or None (unknown card, or the CPU)."""
    return next((peak for part, peak in PEAK_BF16_TFLOPS if part in device_name), None)


def rate_fields(flops: float, seconds: float, peak: float | None, prefix: str = "") -> dict[str, float | None]:
    """``<prefix>tflop_per_s`` and ``<prefix>fraction_of_peak`` (None without a known peak)."""
    tflops = flops / max(seconds, 1e-9) / 1e12
    return {f"{prefix}tflop_per_s": tflops, f"{prefix}fraction_of_peak": tflops / peak if peak else None}


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated memory since the last reset, on CUDA; None on the CPU (not measured)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------------- (a) the bare loop
def bare_inputs(policy: SD3Policy, batch: int) -> dict[str, torch.Tensor]:
    """Random transformer inputs of ``batch`` samples on the device, as :meth:`SD3Policy.velocity` passes them."""
    device, dtype = policy.device, policy.dtype
    prompts = FixedPrompts().prompts
    cond = policy.encode([prompts[i % len(prompts)] for i in range(batch)])
    return {
        "hidden_states": torch.randn(batch, *policy.sample_shape, device=device, dtype=dtype),
        "timestep": torch.rand(batch, device=device) * policy.num_train_timesteps,
        "encoder_hidden_states": cond.tensors["prompt_embeds"].to(dtype),
        "pooled_projections": cond.tensors["pooled_prompt_embeds"].to(dtype),
    }


def bare_step(policy: SD3Policy, inputs: dict[str, torch.Tensor], use_autocast: bool) -> None:
    """One forward + backward of the transformer (θ's LoRA active) on a mean-square loss; no optimizer step."""
    context = torch.autocast(policy.device.type, dtype=policy.dtype) if use_autocast else contextlib.nullcontext()
    with context:
        out = policy.transformer(**inputs, return_dict=False)[0]
    out.float().square().mean().backward()


def count_flops(policy: SD3Policy, inputs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Real FLOPs of one eager forward and of its backward (counted apart), with autocast as the policy runs."""
    with FlopCounterMode(display=False) as forward_counter, torch.autocast(policy.device.type, dtype=policy.dtype):
        out = policy.transformer(**inputs, return_dict=False)[0]
    with FlopCounterMode(display=False) as backward_counter:
        out.float().square().mean().backward()
    clear_grads(policy)
    return float(forward_counter.get_total_flops()), float(backward_counter.get_total_flops())


def clear_grads(policy: SD3Policy) -> None:
    for p in policy.trainable_parameters():
        p.grad = None


@contextlib.contextmanager
def bare_option(policy: SD3Policy, option: str) -> Iterator[bool]:
    """Switch one throughput option on for the bare loop (and off after); yields whether to autocast."""
    transformer: Any = policy.transformer  # diffusers ModelMixin methods, unseen by nn.Module's typing
    if option == "gradient_checkpointing":
        transformer.enable_gradient_checkpointing()
        try:
            yield True
        finally:
            transformer.disable_gradient_checkpointing()
    elif option == "bf16 throughout":
        throughput.lora_in_input_dtype(transformer, on=True)
        try:
            yield False
        finally:
            throughput.lora_in_input_dtype(transformer, on=False)
    elif option.startswith("attention "):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, str(throughput.TORCH_SDPA_BACKENDS[option.split()[1]]))):
            yield True
    else:
        yield True


def bare_row(
    policy: SD3Policy, batch: int, repeats: int, flops: tuple[float, float], peak: float | None, *,
    option: str = "autocast (default)", compiled: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Time the bare loop at ``batch`` (one untimed first step: warm-up, or compilation) under ``option``."""
    inputs = bare_inputs(policy, batch)
    device = policy.device
    with bare_option(policy, option) as use_autocast:
        sync(device)
        started = time.perf_counter()
        bare_step(policy, inputs, use_autocast)
        sync(device)
        first = time.perf_counter() - started
        reset_peak_memory(device)
        started = time.perf_counter()
        for _ in range(repeats):
            bare_step(policy, inputs, use_autocast)
        sync(device)
        seconds = (time.perf_counter() - started) / repeats
    clear_grads(policy)
    return {
        "micro_batch": batch, "option": option, "compiled": compiled, "first_step_seconds": first,
        "seconds_per_step": seconds, "forward_tflop": flops[0] / 1e12, "backward_tflop": flops[1] / 1e12,
        **rate_fields(sum(flops), seconds, peak), "peak_memory_gib": peak_memory_gib(device),
    }  # fmt: skip


def options_rows(policy: SD3Policy, batch: int, repeats: int, flops: tuple[float, float], peak: float | None) -> list:
    """Each throughput option alone at ``batch`` (rates in the plain loop's FLOPs); CUDA-only kernels skipped on
    the CPU, and an option the card refuses is recorded with its error."""
    rows: list[dict[str, Any]] = []
    for option, on_cpu in OPTIONS:
        if policy.device.type != "cuda" and not on_cpu:
            rows.append({"micro_batch": batch, "option": option, "skipped": "needs a CUDA device"})
            continue
        try:
            rows.append(bare_row(policy, batch, repeats, flops, peak, option=option))
        except RuntimeError as error:  # e.g. a kernel this card or these shapes do not support
            clear_grads(policy)
            rows.append({"micro_batch": batch, "option": option, "skipped": f"{type(error).__name__}: {error}"[:300]})
    return rows


# ------------------------------------------------------------------------------------- (b, c) the harness
def method_config(name: str, geometry: Geometry, micro_batch: int) -> Any:
    """The method's config for (b): ``geometry``'s steps and training times; the transformer batch ``micro_batch``."""
    fraction = geometry.train_times / geometry.steps
    if name == "diffusion_nft":
        return DiffusionNFTConfig(num_steps=geometry.steps, shift=3.0, timestep_fraction=fraction,
                                  train_batch_size=micro_batch)  # fmt: skip
    return FlowGRPOConfig(num_steps=geometry.steps, shift=3.0, timestep_fraction=fraction,
                          train_batch_size=max(1, micro_batch // 2), optimizer_steps_per_iteration=1)  # fmt: skip


def harness_row(
    policy: SD3Policy, name: str, geometry: Geometry, micro_batch: int, flops: tuple[float, float],
    peak: float | None, decode_seconds: float, *, compiled: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One iteration of method ``name`` through the shared loop; ``flops``: the bare loop's forward and backward
    FLOPs at this micro-batch, which price the ledger's per-sample forwards and backwards."""
    cfg = method_config(name, geometry, micro_batch)
    per_forward, backward_over_forward = flops[0] / micro_batch, flops[1] / flops[0]
    loop = LoopConfig(iterations=1, evaluate=False, prompts_per_iteration=geometry.prompts,
                      images_per_prompt=geometry.images_per_prompt, seed=1)  # fmt: skip
    reset_peak_memory(policy.device)
    sync(policy.device)
    with known_forward_flops(per_forward):
        ledger = train(METHODS[name], cfg, policy, FixedPrompts(), Brightness(), loop, OptimConfig(), progress=False,
                       label=name).ledger  # fmt: skip
    sync(policy.device)
    seconds = {p: ledger.seconds[p] for p in ("sampling", "reward", "training")}
    fwd, bwd = ledger.forward["training"], ledger.backward["training"]
    sampling_flops = ledger.forward["sampling"] * per_forward
    fwd_equiv = {"sampling": ledger.forward["sampling"], "training": fwd + 2 * bwd}
    return {
        "method": name, "micro_batch": micro_batch, "train_batch_size": cfg.train_batch_size, "compiled": compiled,
        "images": geometry.prompts * geometry.images_per_prompt, "seconds": seconds, "decode_seconds": decode_seconds,
        "forwards": {"sampling": ledger.forward["sampling"], "training": fwd}, "backwards_training": bwd,
        "fwd_equiv": fwd_equiv,
        "fwd_equiv_per_second": {p: fwd_equiv[p] / max(seconds[p], 1e-9) for p in fwd_equiv},
        **rate_fields((fwd + backward_over_forward * bwd) * per_forward, seconds["training"], peak, "training_"),
        **rate_fields(sampling_flops, seconds["sampling"], peak, "sampling_"),
        **rate_fields(sampling_flops, seconds["sampling"] - decode_seconds, peak, "sampling_without_decode_"),
        "peak_memory_gib": peak_memory_gib(policy.device),
    }  # fmt: skip


def time_decode(policy: SD3Policy, images: int) -> float:
    """Seconds to decode ``images`` latents (the sampling phase includes it); one untimed call first."""
    latents = torch.randn(images, *policy.sample_shape)
    policy.decode(latents)
    sync(policy.device)
    started = time.perf_counter()
    policy.decode(latents)
    sync(policy.device)
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------- (d) the tiny DiT
def shapes_cell(
    device: str, suite_name: str, label: str, iterations: int, warmup: int, cpu_reference: Path, *, tiny: bool = False
) -> dict:
    """One variant of ``suite_name`` with ``model.device = device`` through the suite's validation and loader.

    Skipped, with the reason, where validation refuses the device or the loaded model is not on it. ``tiny``:
    2 prompts × 2 images per iteration (the path, not the suite's cost; no comparison with the CPU figure).
    """
    import yaml

    from harness.bench.methods import measure_variant
    from harness.config import ConfigError
    from harness.runner import load_policy
    from harness.suite import suite_path, validate_suite

    row: dict[str, Any] = {"suite": suite_name, "variant": label, "device": device}
    path = suite_path(suite_name)
    data = yaml.safe_load(path.read_text())
    data["model"] = {**(data.get("model") or {}), "device": device}
    if tiny:
        data["train"] = {**data["train"], "prompts_per_iteration": 2, "images_per_prompt": 2}
    try:
        suite = validate_suite(data, str(path))
    except ConfigError as error:
        return {**row, "skipped": f"the suite refuses model.device = {device!r}: {error}"}
    policy = load_policy(suite)
    placed = getattr(policy, "device", None) or policy.trainable_parameters()[0].device
    if torch.device(placed).type != torch.device(device).type:
        return {
            **row,
            "skipped": f"the suite's loader put the {suite.config.model.kind} model on {placed}, not {device}",
        }
    measured, spec = (
        measure_variant(suite, label, iterations, warmup, evaluate=False, policy=policy),
        suite.config.train,
    )
    seconds = measured["total_s"]
    cpu = None
    if cpu_reference.is_file() and not tiny:
        rows = json.loads(cpu_reference.read_text())["rows"]
        cpu = next((r["total_s"] for r in rows if r["run"] == label), None)
    return {
        **row, "geometry": f"{spec.prompts_per_iteration} prompts x {spec.images_per_prompt} images",
        "iterations": iterations, "warmup": warmup, "seconds_per_iteration": seconds,
        "phases": {p: measured[f"{p}_s"] for p in ("sampling", "reward", "training")},
        "cpu_reference": str(cpu_reference), "cpu_seconds_per_iteration": cpu,
        "speedup_over_cpu": cpu / seconds if cpu and seconds > 0 else None,
    }  # fmt: skip


# ------------------------------------------------------------------------------------- cost of a sd35_geneval cell
def sd35_cell_gpu_hours(report: dict[str, Any], *, compiled: bool = False) -> dict[str, dict[str, float]]:
    """GPU-hours of one ``sd35_geneval`` cell per method, from the harness rows (b) of a ``diffrl bench gpu`` JSON.

    Per method, the row (eager, or ``compiled``) whose micro-batch is nearest the suite's transformer batch
    (:data:`SD35_GENEVAL_ITERATION`; ties: the larger) gives forward-equivalents per second in sampling and in
    training. One iteration takes ``sampling / rate_sampling + training / rate_training`` seconds, and a cell
    ``SD35_GENEVAL_BUDGET / (sampling + training)`` iterations. Reward scoring, evaluation and the text encoders
    are not in the bench, so they are not in the result either.
    """
    hours: dict[str, dict[str, float]] = {}
    for method, iteration in SD35_GENEVAL_ITERATION.items():
        rows = [r for r in report.get("harness", []) if r["method"] == method and r["compiled"] == compiled]
        if not rows:
            continue
        row = min(rows, key=lambda r: (abs(r["micro_batch"] - iteration["micro_batch"]), -r["micro_batch"]))
        rates = row["fwd_equiv_per_second"]
        seconds = iteration["sampling"] / rates["sampling"] + iteration["training"] / rates["training"]
        iterations = SD35_GENEVAL_BUDGET / (iteration["sampling"] + iteration["training"])
        hours[method] = {"micro_batch_measured": row["micro_batch"], "seconds_per_iteration": seconds,
                         "iterations": iterations, "gpu_hours": iterations * seconds / 3600}  # fmt: skip
    return hours


# ------------------------------------------------------------------------------------- the report
def _number(value: float | None, digits: int = 1, scale: float = 1.0, unit: str = "") -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}{unit}"


def _tflops(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"  # the --tiny model's rates are far below 1


def _memory(value: float | None) -> str:
    return "not measured (CPU)" if value is None else f"{value:.1f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (from the JSON alone, so it can be rebuilt)."""
    peak, geometry = report["peak_bf16_tflops"], report["geometry"]
    images, steps = geometry["prompts"] * geometry["images_per_prompt"], geometry["steps"]
    lines = [f"# diffrl bench gpu: {report['device']}", "",
             f"Made by `{report['command']}` in {report['total_seconds']:.0f} s; "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ". Dense bf16 peak: "
             + (f"{peak:.0f} TFLOP/s." if peak else "unknown for this device, so no fractions of it."), "",
             "## (a) The limit: forward + backward of the transformer with LoRA, a plain PyTorch loop", "",
             "| micro-batch | compiled | s/step | TFLOP/s | of peak | peak memory GiB | first step s |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['micro_batch']} | {r['compiled']} | {r['seconds_per_step']:.3f} | {_tflops(r['tflop_per_s'])} | "
              f"{_number(r['fraction_of_peak'], 1, 100, '%')} | {_memory(r['peak_memory_gib'])} | "
              f"{r['first_step_seconds']:.1f} |" for r in report.get("bare_loop", [])]  # fmt: skip
    lines += ["", "Throughput options, each alone (rates in the plain loop's FLOPs: recomputation not counted):", "",
              "| option | micro-batch | s/step | TFLOP/s | of peak | peak memory GiB |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in report.get("options", []):
        if "skipped" in r:
            lines.append(f"| {r['option']} | {r['micro_batch']} | skipped: {r['skipped']} | | | |")
            continue
        lines.append(f"| {r['option']} | {r['micro_batch']} | {r['seconds_per_step']:.3f} | {_tflops(r['tflop_per_s'])} | "
                     f"{_number(r['fraction_of_peak'], 1, 100, '%')} | {_memory(r['peak_memory_gib'])} |")  # fmt: skip
    lines += ["", f"## (b, c) The harness: one iteration per method and micro-batch ({images} images, {steps} "
              "sampling steps)", "", "| method | micro-batch | compiled | training TFLOP/s | of peak | of the plain loop "
              "| sampling TFLOP/s (without decode) | s sampling / training | peak memory GiB |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['method']} | {r['micro_batch']} | {r['compiled']} | {_tflops(r['training_tflop_per_s'])} | "
              f"{_number(r['training_fraction_of_peak'], 1, 100, '%')} | "
              f"{_number(r.get('training_over_bare'), 0, 100, '%')} | {_tflops(r['sampling_tflop_per_s'])} "
              f"({_tflops(r['sampling_without_decode_tflop_per_s'])}) | {r['seconds']['sampling']:.2f} / "
              f"{r['seconds']['training']:.2f} | {_memory(r['peak_memory_gib'])} |"
              for r in report.get("harness", [])]  # fmt: skip
    lines += ["", *shapes_lines(report.get("shapes_cell")), "", *cost_lines(report)]
    if report.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(report["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def shapes_lines(cell: dict[str, Any] | None) -> list[str]:
    if cell is None:
        return ["## (d) The tiny DiT: not run"]
    title = f"## (d) The tiny DiT: one {cell['suite']} cell ({cell['variant']}) on {cell['device']}"
    if "skipped" in cell:
        return [title, "", f"Skipped: {cell['skipped']}"]
    cpu, speedup = cell["cpu_seconds_per_iteration"], cell["speedup_over_cpu"]
    return [title, "", f"{cell['seconds_per_iteration']:.2f} s per iteration of {cell['geometry']} (mean of "
            f"{cell['iterations']} after {cell['warmup']} warm-up); 2-core CPU ({cell['cpu_reference']}): "
            + (f"{cpu:.2f} s, {speedup:.1f}× faster here." if cpu and speedup else "no figure.")]  # fmt: skip


def cost_lines(report: dict[str, Any]) -> list[str]:
    lines = ["## sd35_geneval: GPU-hours per cell, extrapolated from (b) (`sd35_cell_gpu_hours`)", "",
             "| method | compiled | micro-batch measured | s/iteration | iterations | GPU-hours |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for compiled in (False, True):
        for method, cost in sd35_cell_gpu_hours(report, compiled=compiled).items():
            lines.append(f"| {method} | {compiled} | {cost['micro_batch_measured']} | {cost['seconds_per_iteration']:.1f} "
                         f"| {cost['iterations']:.0f} | {cost['gpu_hours']:.0f} |")  # fmt: skip
    return lines


# ------------------------------------------------------------------------------------- the run
class BenchRun:
    """The report of one run, its files (rewritten after every section) and its time budget."""

    def __init__(self, report: dict[str, Any], out: Path, budget_seconds: float) -> None:
        self.report, self.budget = report, budget_seconds
        self.compiled_min_seconds = 0.0 if report["mode"] == "tiny" else COMPILED_MIN_SECONDS
        self.started = time.perf_counter()
        slug = "tiny" if report["mode"] == "tiny" else re.sub(r"[^a-z0-9]+", "_", report["device"].lower()).strip("_")
        self.json_path, self.markdown_path = out / f"gpu_bench_{slug}.json", out / f"gpu_bench_{slug}.md"

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def section(self, name: str, measure: Callable[[], None], min_left: float = 0.0) -> None:
        """Run ``measure`` if ``min_left`` seconds of the budget are left, else note the skip; then save."""
        if self.left() < min_left:
            self.report["skipped"].append(
                f"{name} (needs {min_left:.0f} s of --budget-seconds, {self.left():.0f} left)"
            )
        else:
            started = time.perf_counter()
            measure()
            self.report.setdefault("section_seconds", {})[name] = time.perf_counter() - started
        self.save()

    def save(self) -> None:
        self.report["total_seconds"] = time.perf_counter() - self.started
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(self.report, indent=2) + "\n")
        self.markdown_path.write_text(markdown(self.report))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``diffrl bench gpu ARGV``: parse the flags as the command line does and :func:`run` them."""
    from harness.cli import build_parser

    return run(build_parser().parse_args(["bench", "gpu", *(argv or [])]))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every section (module docstring) in order; returns the report, also written under ``args.out``.

    ``--tiny`` runs on one CPU thread: its operations are so small that a second thread costs more than it gives.
    """
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)
    try:
        return run_sections(args)
    finally:
        torch.set_num_threads(threads)


def run_sections(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run` once the threads are set."""
    geometry = TINY if args.tiny else GPU
    if args.micro_batches:
        geometry = Geometry(**{**asdict(geometry), "micro_batches": tuple(args.micro_batches)})
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict[str, Any] = {
        "mode": "tiny" if args.tiny else "full", "device": name,
        "peak_bf16_tflops": peak_tflops(name) if device.type == "cuda" else None, "versions": versions(),
        "command": command_line(args), "geometry": asdict(geometry),
        "compile_backend": args.compile_backend or ("eager" if args.tiny else throughput.COMPILE_BACKEND),
        "skipped": [],
    }  # fmt: skip
    bench = BenchRun(report, args.out, args.budget_seconds)
    cfg = SD3PolicyConfig(resolution=geometry.resolution, dtype="bf16", max_sequence_length=geometry.t5_tokens,
                          lora=SD3LoRAConfig(rank=32, alpha=64.0))  # fmt: skip
    policy = build_sd3_policy(args.tiny, device, cfg)
    report["model"] = {"base_transformer_parameters": sum(p.numel() for p in policy.transformer.parameters())
                       - 2 * sum(p.numel() for p in policy.trainable_parameters()),
                       "lora_parameters_per_adapter": sum(p.numel() for p in policy.trainable_parameters()),
                       "text_tokens": 77 + geometry.t5_tokens, "latent": list(policy.sample_shape)}  # fmt: skip
    flops = measure_eager(bench, policy, geometry)
    shapes_device, (warmup, iterations) = ("cpu", (0, 1)) if args.tiny else (str(device), (1, 2))
    bench.section("(d) the tiny DiT", lambda: report.update(shapes_cell=shapes_cell(
        shapes_device, args.shapes_suite, args.shapes_variant, iterations, warmup, args.cpu_reference, tiny=args.tiny,
    )))  # fmt: skip
    if args.no_compile:
        report["skipped"].append("the compiled sections (--no-compile)")
    else:
        original = throughput.COMPILE_BACKEND
        throughput.COMPILE_BACKEND = report["compile_backend"]
        try:
            measure_compiled(bench, policy, geometry, flops)
        finally:
            throughput.COMPILE_BACKEND = original
            policy.throughput.set_compiled(False)
    bench.save()
    print(bench.markdown_path.read_text())
    return report


def command_line(args: argparse.Namespace) -> str:
    """The ``diffrl bench gpu`` command of ``args`` (the flags that change what is measured)."""
    parts = ["diffrl bench gpu", *(["--tiny"] if args.tiny else [])]
    if args.micro_batches:
        parts += ["--micro-batches", *map(str, args.micro_batches)]
    parts += ["--no-compile"] if args.no_compile else []
    parts += ["--compile-backend", args.compile_backend] if args.compile_backend else []
    return " ".join(parts)


def measure_eager(bench: BenchRun, policy: SD3Policy, geometry: Geometry) -> dict[int, tuple[float, float]]:
    """(a) the plain loop at every micro-batch and the options, (b, c) both methods at every micro-batch, eager.
    Returns the forward and backward FLOPs per micro-batch (counted here, once)."""
    report, peak = bench.report, bench.report["peak_bf16_tflops"]
    flops = {mb: count_flops(policy, bare_inputs(policy, mb)) for mb in geometry.micro_batches}
    first = geometry.micro_batches[0]
    bench.section("(a) the plain loop", lambda: report.update(bare_loop=[
        bare_row(policy, mb, geometry.repeats, flops[mb], peak) for mb in geometry.micro_batches]))  # fmt: skip
    bench.section("(a) the options", lambda: report.update(
        options=options_rows(policy, first, geometry.repeats, flops[first], peak)))  # fmt: skip
    decode = time_decode(policy, geometry.prompts * geometry.images_per_prompt)

    def harness() -> None:
        rows = report.setdefault("harness", [])
        for name in METHODS:
            harness_row(policy, name, geometry, first, flops[first], peak, decode)  # warm-up, not recorded
            rows += [harness_row(policy, name, geometry, mb, flops[mb], peak, decode) for mb in geometry.micro_batches]
        relate_to_bare(report)

    bench.section("(b, c) the harness", harness)
    return flops


def measure_compiled(bench: BenchRun, policy: SD3Policy, geometry: Geometry, flops: dict) -> None:
    """(a) the plain loop with compiled blocks at every micro-batch; (b) both methods compiled at the largest."""
    report, peak = bench.report, bench.report["peak_bf16_tflops"]

    def bare() -> None:
        policy.throughput.set_compiled(True)
        try:
            batches = geometry.micro_batches if geometry.compile_all else geometry.micro_batches[-1:]
            rows = [bare_row(policy, mb, geometry.repeats, flops[mb], peak, compiled=True) for mb in batches]
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # a compile failure: the bare loop has no eager fallback of its own
            policy.throughput.set_compiled(False)
            clear_grads(policy)
            report["skipped"].append(f"the compiled plain loop: {type(error).__name__}: {str(error)[:200]}")
            return
        report.setdefault("bare_loop", []).extend(rows)

    def harness() -> None:
        last = geometry.micro_batches[-1]
        decode = time_decode(policy, geometry.prompts * geometry.images_per_prompt)
        for name in METHODS:
            harness_row(policy, name, geometry, last, flops[last], peak, decode, compiled=True)  # compiles: untimed
            row = harness_row(policy, name, geometry, last, flops[last], peak, decode, compiled=True)
            row["compiled"] = bool(policy.throughput.compiled)  # False where it fell back to eager (warned)
            report.setdefault("harness", []).append(row)
        relate_to_bare(report)

    bench.section("(a) the compiled plain loop", bare, bench.compiled_min_seconds)
    if policy.throughput.compiled:
        bench.section("(b, c) the compiled harness", harness, bench.compiled_min_seconds)


def relate_to_bare(report: dict[str, Any]) -> None:
    """Each harness row's training TFLOP/s over the plain loop's at its micro-batch (compiled with compiled)."""
    bare = {(r["micro_batch"], r["compiled"]): r["tflop_per_s"] for r in report.get("bare_loop", [])}
    for row in report.get("harness", []):
        reference = bare.get((row["micro_batch"], row["compiled"]))
        row["training_over_bare"] = row["training_tflop_per_s"] / reference if reference else None
