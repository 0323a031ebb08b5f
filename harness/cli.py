"""The ``diffrl`` command line.

``list``, ``pretrain``, ``pretrain-reward``; ``run`` (a suite file), with ``train`` (one method, one seed) and
``evaluate`` (a checkpoint) as front ends over the same suite machinery; ``report``, ``plot``, ``table``;
``serve-reward``, ``geneval``; ``export-lora`` (an SD3/FLUX checkpoint's LoRA for diffusers); and
``bench methods|overhead|rewards|gpu``, the one home of speed benchmarks. Each command is a ``cmd_<name>``
function and an ``add_<name>`` sub-parser builder.

User errors (missing or malformed files, offline downloads, missing extras, bad flags) print one line,
``diffrl <command>: <message>``, and exit with status 2; ``-v`` adds the traceback. ``--help`` shows defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("diffrl")
JUDGEMENTS = ["correct", "strict", "score"]  # the values of rewards.shapes.Judgement, default first
JUDGEMENT_HELP = (
    "training reward: the official GenEval rule (correct, default on shapes), FlowGRPO's strict rule, "
    "or FlowGRPO's partial-credit score (its training reward; docs/rewards.md)"
)
SHAPES_LR = 1e-4  # full fine-tuning of the 2M-parameter shapes model (the official 3e-4 is for LoRA on 2.5B)
USER_ERROR = 2  # exit status of a user error: invalid suite, flags, files, a missing extra (argparse's exit 2 too)
INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT)
OWN_PACKAGES = ("harness", "methods", "rewards", "benchmarks", "tests")  # a missing one of these is a bug, not an extra
Subparsers = Any  # argparse's _SubParsersAction, which it does not export


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, unless it is None/False or the help text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class SubcommandParser(argparse.ArgumentParser):
    """Every sub-command's parser: :class:`HelpFormatter`, ``-v`` after the command too, defaults on help-less flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        # SUPPRESS: a sub-command without -v leaves the top-level --verbose as it was.
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="log at INFO level; print tracebacks of user errors")  # fmt: skip

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        default, named = kwargs.get("default"), bool(args) and str(args[0]).startswith("-")
        if named and "help" not in kwargs and default is not None and default is not False:
            kwargs["help"] = "default: %(default)s"
        return super().add_argument(*args, **kwargs)


def _registries() -> dict[str, object]:
    from benchmarks import BENCHMARKS
    from methods import METHODS
    from rewards import REWARDS

    return {"methods": METHODS, "rewards": REWARDS, "benchmarks": BENCHMARKS}


def _user_error(command: str, error: object) -> int:
    """Report an invalid suite or invalid flags in one line (no traceback); the exit status says which."""
    print(f"{command}: {error}", file=sys.stderr)
    return USER_ERROR


# --- list, pretrain, pretrain-reward -----------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    registry = _registries()[args.kind]
    entries = registry.entries()  # type: ignore[attr-defined]
    if not entries:
        print(f"no {args.kind} registered yet")
    width = max((len(e.key) for e in entries), default=0)
    for entry in entries:
        print(f"{entry.key:<{width}}  {entry.description}")
    return 0


def add_list(sub: Subparsers) -> None:
    p = sub.add_parser("list", help="list registered methods, rewards or benchmarks")
    p.add_argument("kind", choices=["methods", "rewards", "benchmarks"])
    p.set_defaults(func=cmd_list)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from benchmarks.shapes.pretrain import PretrainConfig, pretrain
    from harness.config import ConfigError, call_checked, parse_overrides

    steps = PretrainConfig().steps if args.steps is None else args.steps
    recipe = {"steps": steps, "seed": args.seed, "save_every": args.save_every} | parse_overrides(args.set or [])
    cfg = call_checked(PretrainConfig, recipe, "pretrain --set")
    try:
        out = pretrain(cfg, Path(args.out), resume=args.resume)
    except ConfigError as error:  # --resume of a run saved by another recipe or length
        return _user_error("diffrl pretrain", error)
    print(f"wrote {out}")
    return 0


def add_pretrain(sub: Subparsers) -> None:
    p = sub.add_parser("pretrain", help="pretrain a benchmark's base model (deterministic)")
    p.add_argument("benchmark", choices=["shapes"])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the committed base's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="also save every N steps into OUT/step_N")
    p.add_argument("--out", default="results/pretrain/shapes_base", help="checkpoint folder to write")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in OUT from OUT/resume.pt (saved with every checkpoint)"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a field of the recipe (PretrainConfig), e.g. caption_noise=0.3")  # fmt: skip
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain_reward(args: argparse.Namespace) -> int:
    from harness.train_classifier import ClassifierTrainConfig, measure_report, train_classifier

    out = Path(args.out)
    if not args.measure_only:
        defaults = ClassifierTrainConfig()
        cfg = ClassifierTrainConfig(
            steps=defaults.steps if args.train_steps is None else args.train_steps,
            seed=args.seed,
            base_samples=defaults.base_samples if args.base_samples is None else args.base_samples,
        )
        print(f"wrote {train_classifier(cfg, out)}")
    if not args.no_measure:
        report = measure_report(out)
        (out / "agreement.md").write_text(report)
        print(report)
    return 0


def add_pretrain_reward(sub: Subparsers) -> None:
    p = sub.add_parser(
        "pretrain-reward", help="train the shapes world's differentiable reward (shapes_classifier; deterministic)"
    )
    p.add_argument("--out", default="results/pretrain/shapes_classifier", help="asset folder to write")
    p.add_argument("--steps", dest="train_steps", metavar="N", type=int, default=None,
                   help="optimizer steps (default: the committed asset's)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-samples", type=int, default=None, help="base-model samples mixed into training")
    p.add_argument("--measure-only", action="store_true", help="only measure agreement of the asset at --out")
    p.add_argument("--no-measure", action="store_true", help="skip the agreement measurement (OUT/agreement.md)")
    p.set_defaults(func=cmd_pretrain_reward)


# --- evaluate and train: front ends over a suite's sections and a one-variant suite -------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    """The untrained model as every suite cell evaluates it: the suite's model loader, benchmark and eval spec."""
    from harness.config import ConfigError, build
    from harness.suite import BenchmarkSpec, EvalSpec, make_benchmark

    scales = args.cfg or [1.0]
    if args.json and len(scales) > 1:
        raise SystemExit("--json prints one JSON object: give at most one --cfg")
    if args.curve and not args.out:
        raise SystemExit("--curve writes curve.csv and curve.png: give --out")
    try:
        spec = build(EvalSpec, {"sampler": args.sampler, "num_steps": args.steps}, where="suite.eval")
        settings = [spec.settings(scale) for scale in scales]
        benchmark = make_benchmark(BenchmarkSpec(name=args.benchmark))
        if args.curve:
            return _evaluate_curve(args, benchmark, spec, scales, settings)
        rows = _evaluate_checkpoint(args, args.checkpoint, benchmark, spec, scales, settings, Path(args.out or "."))
    except ValueError as error:  # ConfigError, or EvalSettings refusing a --cfg
        return _user_error("diffrl evaluate", error if isinstance(error, ConfigError) else f"--cfg: {error}")
    if args.out:
        _write_eval_tables(Path(args.out), rows, benchmark.metrics, args)
    return 0


def _evaluate_checkpoint(
    args: argparse.Namespace, checkpoint: str | None, benchmark: Any, spec: Any, scales: list[float],
    settings: list[Any], out: Path, grids: bool = True,
) -> list[dict[str, float]]:  # fmt: skip
    """One checkpoint at each CFG scale: printed, and its sample grids written into ``out`` (``--out``)."""
    from harness.config import build
    from harness.evaluate import evaluate_policy
    from harness.images import save_grid
    from harness.runner import load_model
    from harness.samplers import make_sampler
    from harness.suite_model import ModelSpec, check_model

    model, model_config = check_model(build(ModelSpec, {"checkpoint": checkpoint}, where="suite.model"))
    policy = load_model(model, model_config)
    rows = []
    for scale, setting in zip(scales, settings, strict=True):
        output = evaluate_policy(policy, benchmark, make_sampler(spec.sampler), setting, progress=not args.json)
        scores = {k: round(v, 4) for k, v in output.scores.items()}
        rows.append({"cfg": scale, **scores})
        if args.out and grids:
            assert output.images is not None  # one process: the main one holds the images
            save_grid(output.images[:: benchmark.images_per_prompt], out / f"samples_cfg{scale:g}.png", columns=16)
        if args.json:
            print(json.dumps(scores))
        else:
            print(f"{checkpoint or 'committed base'}: {len(output.prompts)} images, {args.sampler} {args.steps} steps, "
                  f"cfg {scale:g}")  # fmt: skip
            for key in benchmark.metrics:
                print(f"  {key:<16} {scores[key]:.4f}")
    return rows


def _evaluate_curve(
    args: argparse.Namespace, benchmark: Any, spec: Any, scales: list[float], settings: list[Any]
) -> int:  # fmt: skip
    """``--curve DIR``: every ``DIR/step_<k>`` of a ``--save-every`` pretraining run, and DIR itself (its last step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(args.curve)
    folders = {int(p.name.removeprefix("step_")): p for p in root.glob("step_*") if p.is_dir()}
    if (root / "config.json").is_file():
        folders[int(json.loads((root / "config.json").read_text())["pretrain"]["steps"])] = root
    if not folders:
        raise SystemExit(f"--curve {root}: no step_<k> checkpoint folders and no checkpoint in it")
    rows = []
    for step in sorted(folders):
        found = _evaluate_checkpoint(args, str(folders[step]), benchmark, spec, scales, settings, root, grids=False)
        rows += [{"step": step, **row} for row in found]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = ["step", "cfg", *benchmark.metrics]
    lines = [",".join(columns)] + [",".join(str(row[c]) for c in columns) for row in rows]
    (out / "curve.csv").write_text("\n".join(lines) + "\n")
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for scale in scales:
        mine = [row for row in rows if row["cfg"] == scale]
        steps = [row["step"] for row in mine]
        left.plot(steps, [row["overall"] for row in mine], marker="o", label=f"overall, CFG {scale:g}")
        left.plot(steps, [row["strict_overall"] for row in mine], ls="--", marker=".", label=f"strict, CFG {scale:g}")
        right.plot(steps, [row["extra_objects"] for row in mine], marker="o", label=f"CFG {scale:g}")
    left.set(xlabel="pretraining step", ylabel="GenEval score (shapes)", ylim=(0, 1))
    right.set(xlabel="pretraining step", ylabel="extra objects per image")
    left.legend(fontsize=7), right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "curve.png", dpi=120)
    command = f"diffrl evaluate {args.benchmark} --curve {root} --sampler {args.sampler} --steps {args.steps} "
    (out / "curve.md").write_text(f"Made by `{command}{' '.join(f'--cfg {s:g}' for s in scales)} --out {out}`.\n")
    print(f"wrote {out / 'curve.csv'} and {out / 'curve.png'}")
    return 0


def _write_eval_tables(
    out: Path, rows: list[dict[str, float]], metrics: Sequence[str], args: argparse.Namespace
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    command = f"diffrl evaluate {args.benchmark} --sampler {args.sampler} --steps {args.steps} "
    command += " ".join(f"--cfg {row['cfg']:g}" for row in rows)
    command += f" --checkpoint {args.checkpoint}" if args.checkpoint else ""
    scores = {"checkpoint": args.checkpoint or "committed base", "sampler": args.sampler, "steps": args.steps,
              "rows": rows}  # fmt: skip
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    header = "| cfg | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    lines += ["| " + f"{row['cfg']:g} | " + " | ".join(f"{row[m]:.3f}" for m in metrics) + " |" for row in rows]
    (out / "scores.md").write_text("\n".join(lines) + f"\n\nMade by `{command} --out {out}`.\n")


def add_evaluate(sub: Subparsers) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a benchmark's held-out eval set (as suites do)")
    p.add_argument("benchmark", choices=["shapes"])
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the committed base)")
    p.add_argument("--sampler", default="euler", choices=["euler", "dpm2"])
    p.add_argument("--steps", type=int, default=10, help="sampling steps")
    p.add_argument("--cfg", type=float, action="append", help="CFG scale (1 = none); repeat to compare scales")
    p.add_argument("--out", default=None, help="write scores.json, scores.md and sample grids into this folder")
    p.add_argument("--json", action="store_true", help="print one JSON object: overall and per-task scores")
    p.add_argument("--curve", default=None, metavar="DIR",
                   help="evaluate every DIR/step_<k> of a pretraining run; write curve.csv/.png into --out")  # fmt: skip
    p.set_defaults(func=cmd_evaluate)


def train_suite(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of ``diffrl train`` as a one-variant, one-seed suite (what ``diffrl run`` reads from YAML)."""
    from harness.config import ConfigError, parse_overrides

    if args.judgement != JUDGEMENTS[0] and args.reward != "shapes_geneval":
        raise ConfigError(f"--judgement {args.judgement} configures --reward shapes_geneval, not {args.reward}")
    if args.budget:  # forward-equivalents, with --iterations as the cap
        budget = {"unit": "fwd_equiv", "amount": args.budget}
    else:
        budget = {"unit": "iterations", "amount": args.iterations}
    return {
        "name": f"train-{args.method}",
        "description": f"diffrl train {args.benchmark} --method {args.method}: one variant, one seed",
        "benchmark": {"name": args.benchmark},
        "model": {"kind": "tiny_dit", "checkpoint": args.checkpoint},
        "rewards": {args.reward: {"options": {"judgement": args.judgement} if args.reward == "shapes_geneval" else {}}},
        "methods": [{"label": args.method, "method": args.method, "config": parse_overrides(args.set or [])}],
        "seeds": [args.seed],
        "budget": {**budget, "eval_at": args.eval_at or []},
        "train": {"max_iterations": args.iterations, "optim": {"lr": args.lr}},
    }


def cmd_train(args: argparse.Namespace) -> int:
    """One method and seed through ``diffrl run``'s runner: the same loop, checkpoints, resume and result files."""
    import yaml

    from harness.config import ConfigError
    from harness.distributed import from_environment
    from harness.runner import cell_dir, run_suite
    from harness.suite import validate_suite

    try:
        data = train_suite(args)
        suite = validate_suite(data, source="diffrl train")
    except ConfigError as error:
        return _user_error("diffrl train", error)
    if args.check:
        print(yaml.safe_dump(suite.resolved(), sort_keys=False), end="")
        return 0
    out = Path(args.out) if args.out else Path("results") / "train" / f"{args.method}-seed{args.seed}"
    processes = from_environment()  # several processes under accelerate launch; the main one writes
    outcome = run_suite(suite, out, progress=not args.no_progress, processes=processes)
    processes.close()
    if not processes.is_main:
        return 0
    for cell in outcome.failed:
        print(f"FAILED {cell.label} seed {cell.seed}: {cell.error}", file=sys.stderr)
    print(f"wrote {cell_dir(out, args.method, args.seed)} (evals.jsonl, iterations.jsonl) and {out}/results.csv")
    return 1 if outcome.failed else 0


def add_train(sub: Subparsers) -> None:
    p = sub.add_parser("train", help="train one method from a checkpoint (a one-variant suite; resumable)")
    p.add_argument("benchmark", choices=["shapes"])
    p.add_argument("--method", required=True, help="a registered method (diffrl list methods)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of the method's config")
    p.add_argument("--iterations", type=int, default=20, help="iterations (the cap, with --budget)")
    p.add_argument("--budget", type=float, default=0, help="stop once this many forward-equivalents are spent")
    p.add_argument("--eval-at", type=float, nargs="+", metavar="FRACTION",
                   help="also evaluate at these fractions of the budget (default: before and after training)")  # fmt: skip
    p.add_argument("--lr", type=float, default=SHAPES_LR, help="AdamW learning rate (full fine-tuning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="start from this checkpoint (default: the committed base)")
    p.add_argument("--out", default=None, help="results folder (default: results/train/METHOD-seedSEED)")
    p.add_argument("--judgement", default="correct", choices=JUDGEMENTS, help=JUDGEMENT_HELP)
    p.add_argument(
        "--reward", default="shapes_geneval", help="the training reward (a registered name; draft needs a differentiable "
        "one, e.g. shapes_classifier); the eval metric stays the shapes GenEval rules"
    )  # fmt: skip
    p.add_argument("--check", action="store_true", help="validate the flags and print them as a suite file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (evaluation lines stay)")
    p.set_defaults(func=cmd_train)


# --- run, report -----------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from harness.config import ConfigError
    from harness.distributed import from_environment
    from harness.report import write_report
    from harness.runner import run_suite
    from harness.suite import load_suite

    try:
        suite = load_suite(args.suite)
    except ConfigError as error:
        return _user_error("invalid suite", error)
    if args.check:
        print(f"suite {suite.name!r} is valid: {len(suite.config.methods)} variants x {len(suite.config.seeds)} seeds")
        return 0
    out = Path(args.out) if args.out else Path("results") / suite.name
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    processes = from_environment()  # several processes under accelerate launch; the main one writes
    outcome = run_suite(suite, out, progress=not args.no_progress, processes=processes)
    processes.close()
    if not processes.is_main:
        return 0
    if any(c.status == "done" for c in outcome.cells):
        command = f"diffrl run {args.suite}" + (f" --out {args.out}" if args.out else "")
        print(f"wrote {write_report(out, command)}")
    for cell in outcome.failed:
        print(f"FAILED {cell.label} seed {cell.seed}: {cell.error}", file=sys.stderr)
    return 1 if outcome.failed else 0


def add_run(sub: Subparsers) -> None:
    p = sub.add_parser("run", help="run (or resume) a comparison suite; writes results/<suite>/")
    shipped = sorted(p.stem for p in (Path(__file__).parent / "suites").glob("*.yaml"))  # harness.suite imports torch
    p.add_argument("suite", help=f"a suite .yaml file or a built-in suite name ({', '.join(shipped)})")
    p.add_argument("--out", default=None, help="suite folder (default: results/<suite name>)")
    p.add_argument("--check", action="store_true", help="validate the suite (every key and value) and exit")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (evaluation lines stay)")
    p.set_defaults(func=cmd_run)


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import write_report

    folder = Path(args.folder)
    if not (folder / "suite.yaml").is_file():
        raise SystemExit(f"{folder} is not a suite folder written by 'diffrl run' (no suite.yaml)")
    print(f"wrote {write_report(folder)}")
    return 0


def add_report(sub: Subparsers) -> None:
    p = sub.add_parser("report", help="rebuild a suite folder's README, plots and tables")
    p.add_argument("folder", help="a folder written by 'diffrl run' or 'diffrl train'")
    p.set_defaults(func=cmd_report)


# --- rewards: serve one, score a GenEval folder -------------------------------------------------------------


def cmd_serve_reward(args: argparse.Namespace) -> int:
    from harness.config import parse_overrides
    from rewards.server import serve_reward

    try:
        serve_reward(args.name, args.host, args.port, token=args.token, insecure=args.insecure,
                     **parse_overrides(args.set or []))  # fmt: skip
    except (KeyError, ValueError) as error:  # an unknown reward, bad options (ConfigError), an unguarded address
        return _user_error(f"diffrl serve-reward {args.name}", error)
    return 0


def add_serve_reward(sub: Subparsers) -> None:
    p = sub.add_parser("serve-reward", help="serve a registered reward over HTTP (for other processes/hosts)")
    p.add_argument("name", help="a registered reward (diffrl list rewards)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to accept other hosts)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="an option of the reward's factory")
    p.add_argument("--token", default=None, help="bearer token every request must carry (default: "
                   "$DIFFRL_REWARD_TOKEN; clients read the same variable). Prefer the variable: flags show in ps")  # fmt: skip
    p.add_argument("--insecure", action="store_true",
                   help="serve a non-loopback --host without a token (anyone who reaches it can use the reward)")  # fmt: skip
    p.set_defaults(func=cmd_serve_reward)


def cmd_geneval(args: argparse.Namespace) -> int:
    """The folder is checked first, then the class names (never downloaded when a local copy exists), then models."""
    from harness.data_files import PromptFileError
    from rewards.geneval_detect.folder import score_image_folder

    out = Path(args.out) if args.out else Path(args.image_dir) / "geneval_results"
    try:
        summary = score_image_folder(
            Path(args.image_dir), out, args.backend, detector_path=args.detector, detector_config=args.detector_config,
            clip_path=args.clip, device=args.device, batch_size=args.batch_size, rgb_as_bgr=args.rgb_as_bgr,
            class_names=args.class_names, data_dir=args.data_dir,
        )  # fmt: skip
    except PromptFileError as error:  # only the class names are fetched here
        return _user_error(
            "diffrl geneval", f"GenEval's class names: {error} Here: --class-names FILE or --data-dir DATA_DIR."
        )
    print(summary.table())
    print(f"{summary.n_images} images of {summary.n_prompts} prompts, backend {summary.backend}; wrote {out}")
    return 0


def add_geneval(sub: Subparsers) -> None:
    p = sub.add_parser("geneval", help="score a GenEval image folder (<index>/metadata.jsonl, <index>/samples/)")
    p.add_argument("image_dir", help="a folder laid out as GenEval's generation script writes it")
    p.add_argument("--out", default=None, help="results.jsonl and summary.json (default IMAGE_DIR/geneval_results)")
    p.add_argument(
        "--backend", default="mmdet", choices=["mmdet", "hf"], help="mmdet: the official detector (reproduces "
        "published numbers); hf: transformers' Mask2Former"
    )  # fmt: skip
    p.add_argument("--detector", default=None, help="detector checkpoint (file or folder; hf: a model id too)")
    p.add_argument("--detector-config", default=None, help="mmdet config (default: GenEval's Mask2Former Swin-S)")
    p.add_argument("--clip", default=None, help="CLIP ViT-L/14 for colours (default openai/clip-vit-large-patch14)")
    p.add_argument("--class-names", default=None, help="GenEval's object_names.txt (default: DATA_DIR/geneval/"
                   "object_names.txt with --data-dir, else $DIFFRL_CACHE/prompt_sets/geneval/object_names.txt "
                   "(~/.cache/diffrl/...), downloaded there only when absent)")  # fmt: skip
    p.add_argument("--data-dir", default=None, help="a folder laid out like shared/data: class names read from "
                   "DATA_DIR/geneval/object_names.txt, never downloaded")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rgb-as-bgr", action="store_true", help="reproduce FlowGRPO/DiffusionNFT's channel swap")
    p.set_defaults(func=cmd_geneval)


# --- export-lora: an SD3/FLUX run's LoRA as diffusers reads it ----------------------------------------------


def cmd_export_lora(args: argparse.Namespace) -> int:
    """θ (or its EMA) of a run's checkpoint as ``OUT/pytorch_lora_weights.safetensors``; no model is loaded."""
    from harness.config import ConfigError
    from harness.policies.lora import export_checkpoint_lora

    checkpoint = Path(args.checkpoint)
    checkpoint = checkpoint / "checkpoint.pt" if checkpoint.is_dir() else checkpoint
    if not checkpoint.is_file():
        return _user_error(
            "diffrl export-lora", f"{checkpoint} does not exist; pass a cell's checkpoint.pt or its folder"
        )
    try:
        kind, lora = run_lora_settings(checkpoint, Path(args.suite) if args.suite else None)
        out = export_checkpoint_lora(checkpoint, Path(args.out), kind, lora, ema=args.ema)
    except (ConfigError, ValueError) as error:
        return _user_error("diffrl export-lora", error)
    which = "the EMA of θ" if args.ema else "θ"
    print(f"wrote {out}/pytorch_lora_weights.safetensors: {which}, {kind} LoRA r {lora.rank}, alpha {lora.alpha:g}")
    return 0


def run_lora_settings(checkpoint: Path, suite_file: Path | None = None) -> tuple[str, Any]:
    """(model kind, LoRA config) of the run that wrote ``checkpoint``: from ``suite_file``, else the ``suite.yaml``
    that ``diffrl run`` wrote four levels up (``SUITE/cells/VARIANT/seedK/checkpoint.pt``)."""
    import yaml

    from harness.config import ConfigError, build
    from harness.policies.flux import FluxLoRAConfig
    from harness.policies.sd3 import SD3LoRAConfig

    parents = checkpoint.resolve().parents
    path = suite_file or (parents[3] / "suite.yaml" if len(parents) > 3 else None)
    if path is None or not path.is_file():
        raise ConfigError(
            f"no suite file at {path}: a run's checkpoint sits at SUITE/cells/VARIANT/seedK/checkpoint.pt beside "
            "SUITE/suite.yaml; pass --suite with the suite file of the run"
        )
    data = yaml.safe_load(path.read_text())
    model = data.get("model") if isinstance(data, dict) else None
    kind = model.get("kind", "tiny_dit") if isinstance(model, dict) else None
    configs: dict[str, type] = {"sd3": SD3LoRAConfig, "flux": FluxLoRAConfig}
    if not isinstance(model, dict) or kind not in configs:
        raise ConfigError(f"{path}: model.kind is {kind!r}; only sd3 and flux runs train LoRA adapters")
    options = model.get("options") or {}
    return str(kind), build(configs[str(kind)], options.get("lora") or {}, where="suite.model.options.lora")


def add_export_lora(sub: Subparsers) -> None:
    p = sub.add_parser("export-lora", help="write an SD3/FLUX run checkpoint's LoRA (θ, or --ema) as a diffusers "
                       "LoRA folder that pipeline.load_lora_weights reads")  # fmt: skip
    p.add_argument("checkpoint", help="a cell's checkpoint.pt (results/SUITE/cells/VARIANT/seedK/), or that folder")
    p.add_argument("out", help="folder to write pytorch_lora_weights.safetensors into (created; other files are kept)")
    p.add_argument("--ema", action="store_true", help="export the EMA of θ (the weights evaluations use), not θ")
    p.add_argument("--suite", default=None, help="the run's suite file, for the LoRA rank/alpha/targets "
                   "(default: SUITE/suite.yaml four levels above the checkpoint)")  # fmt: skip
    p.set_defaults(func=cmd_export_lora)


# --- plot, table -------------------------------------------------------------------------------------------


def _read_results(path: str) -> Any:
    from harness.store import read_results

    try:
        return read_results(Path(path))
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None


def _comparison(args: argparse.Namespace, df: Any) -> Any:
    """The flags of ``diffrl table`` / ``plot`` as a :class:`harness.report.Comparison` (a bad flag: SystemExit)."""
    import math

    from harness.report import Comparison
    from harness.statistics import DEFAULT_GAIN, Target
    from harness.tables import final_scores

    chosen = [f for f in ("target", "target_final", "target_gain", "target_variant") if getattr(args, f) not in
              (None, False)]  # fmt: skip
    if args.reference is None and chosen:
        flag = "--" + chosen[0].replace("_", "-")
        raise SystemExit(f"{flag} needs --reference VARIANT: speedups are relative to it")
    variants = sorted(df["variant"].unique())
    for flag, variant in (("--reference", args.reference), ("--target-variant", args.target_variant)):
        if variant is not None and variant not in variants:
            raise SystemExit(f"{flag} {variant!r} is not in the table; variants: {', '.join(variants)}")
    if args.metric not in df.columns or args.unit not in df.columns:
        missing = args.metric if args.metric not in df.columns else args.unit
        raise SystemExit(f"the table has no column {missing!r}; it has {', '.join(map(str, df.columns))}")
    if args.target_gain is not None and not 0 < args.target_gain <= 1:
        raise SystemExit(f"--target-gain must be a fraction in (0, 1] of the reference's gain, got {args.target_gain}")
    if args.target is not None and not math.isfinite(args.target):
        raise SystemExit(f"--target must be a finite score, got {args.target}")
    if args.target is not None:
        target = Target("absolute", args.target)
    elif args.target_final:
        target = Target("reference_final", 1.0)
    elif args.target_variant is not None:
        scores = final_scores(df, [args.metric], args.unit)
        target = Target("absolute", float(scores.loc[args.target_variant, f"{args.metric}/mean"]))
    else:
        target = Target("reference_gain", DEFAULT_GAIN if args.target_gain is None else args.target_gain)
    if args.resamples < 100:
        raise SystemExit(f"--resamples must be at least 100, got {args.resamples}")
    return Comparison(args.metric, args.unit, args.reference, target, args.resamples, args.seed)


def _comparison_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="a results table (.csv or .parquet) or a suite folder")
    p.add_argument("--metric", default="eval/overall")
    p.add_argument("--unit", default="compute/fwd_equiv",
                   help="compute/fwd_equiv, compute/flops, compute/wall_seconds, compute/images_sampled, iteration")  # fmt: skip
    p.add_argument("--reference", default=None, help="speedups and differences are relative to this variant")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-gain", type=float, default=None, metavar="F",
                        help="target: a fraction F in (0, 1] of the reference's final seed-mean gain over the "
                        "untrained model (default with --reference: 0.8)")  # fmt: skip
    target.add_argument("--target-final", action="store_true", help="target: the reference's final seed-mean score")
    target.add_argument("--target", type=float, default=None, metavar="SCORE", help="target: an absolute score")
    target.add_argument("--target-variant", default=None, metavar="V",
                        help="target: variant V's final seed-mean score, as a fixed number")  # fmt: skip
    p.add_argument("--resamples", type=int, default=5000, help="bootstrap resamples (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed (a table is reproducible)")


def cmd_plot(args: argparse.Namespace) -> int:
    from harness.plots import efficiency_curve, per_task_curves, speedup_chart
    from harness.tables import target_rows

    df = _read_results(args.results)
    c = _comparison(args, df)
    folder = Path(args.results) if Path(args.results).is_dir() else Path(args.results).parent
    name, unit = c.metric.split("/")[-1], c.unit.split("/")[-1]
    if args.kind == "tasks":
        out = Path(args.out) if args.out else folder / f"metrics_vs_{unit}"
        metrics = [col for col in df.columns if col.startswith("eval/") and col != c.metric]
        paths = per_task_curves(df, metrics or [c.metric], c.unit, out, log_x=args.log_x)
    elif args.kind == "speedup":
        if c.reference is None:
            raise SystemExit("--kind speedup needs --reference VARIANT")
        tau, rows = target_rows(df, c.metric, c.unit, c.target, c.reference, resamples=c.resamples, seed=c.seed)
        out = Path(args.out) if args.out else folder / f"speedup_{name}_{unit}"
        paths = speedup_chart(df, rows, tau, c.metric, c.unit, c.reference, c.target.describe(c.reference), out)
    else:
        tau = None
        if c.reference is not None:
            tau = target_rows(df, c.metric, c.unit, c.target, c.reference, resamples=100)[0]  # the target only
        out = Path(args.out) if args.out else folder / f"{name}_vs_{unit}"
        paths = efficiency_curve(df, c.metric, c.unit, out, log_x=args.log_x, target=tau)
    for path in paths:
        print(f"wrote {path}")
    return 0


def add_plot(sub: Subparsers) -> None:
    p = sub.add_parser("plot", help="paper figures from a results table: efficiency curve, per-task panels, speedups")
    _comparison_flags(p)
    p.add_argument("--kind", default="curve", choices=["curve", "tasks", "speedup"],
                   help="curve: --metric against --unit (with the target line given --reference); tasks: every "
                   "other metric, one panel each; speedup: each variant's speedup over --reference with its interval")  # fmt: skip
    p.add_argument("--log-x", action="store_true", help="symmetric-log compute axis (0: the untrained model)")
    p.add_argument("--out", default=None, help="output path without suffix (PNG and PDF are written)")
    p.set_defaults(func=cmd_plot)


def cmd_table(args: argparse.Namespace) -> int:
    from harness.evaluate import EvalNoise
    from harness.report import compare

    df = _read_results(args.results)
    c = _comparison(args, df)
    if args.matched and c.reference is None:
        raise SystemExit("--matched needs --reference VARIANT")
    result = compare(df, EvalNoise.load(Path(args.results)), c, matched=args.matched)
    print("\n".join(t.latex() if args.latex else t.markdown() for t in result.tables.values()))
    return 0


def add_table(sub: Subparsers) -> None:
    p = sub.add_parser("table", help="final scores, compute-to-target, speedups and aggregates from a results table")
    _comparison_flags(p)
    p.add_argument("--matched", action="store_true",
                   help="also each variant's score at each eval point and its paired difference to --reference")  # fmt: skip
    p.add_argument("--latex", action="store_true", help="print the tables as LaTeX")
    p.set_defaults(func=cmd_table)


# --- bench: speed and memory benchmarks (not tests) ---------------------------------------------------------


def cmd_bench_methods(args: argparse.Namespace) -> int:
    from harness.bench.methods import bench_methods

    print(bench_methods(Path(args.out), args.iterations, args.warmup, args.threads, args.suite).read_text())
    return 0


def cmd_bench_overhead(args: argparse.Namespace) -> int:
    from harness.bench.methods import bench_overhead

    print(bench_overhead(args.suite, Path(args.out), args.threads).read_text())
    return 0


def cmd_bench_rewards(args: argparse.Namespace) -> int:
    from harness.bench.rewards import bench_rewards

    path = bench_rewards(Path(args.out), args.size, args.repeats, args.batches, args.ocr_images, ocr=not args.no_ocr)
    print(path.read_text())
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from harness.bench.gpu import run

    run(args)
    return 0


def cmd_bench_sd3_check(args: argparse.Namespace) -> int:
    from harness.bench.sd3_check import run

    run(args)
    return 0


def add_bench(sub: Subparsers) -> None:
    bench = sub.add_parser("bench", help="speed and memory benchmarks (not tests): methods, overhead, rewards, gpu, "
                           "sd3-check")  # fmt: skip
    what = bench.add_subparsers(dest="what", required=True)
    p = what.add_parser("methods", help="s/iteration per phase and peak memory of each variant of a suite")
    p.add_argument(
        "--suite", default="shapes_quick", help="measure its variants at its geometry; estimate its run time"
    )
    p.add_argument("--iterations", type=int, default=2, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/bench")
    p.set_defaults(func=cmd_bench_methods)
    p = what.add_parser("overhead", help="a suite run from scratch: wall time split into methods, eval and harness")
    p.add_argument("--suite", default="shapes_quick")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/bench")
    p.set_defaults(func=cmd_bench_overhead)
    p = what.add_parser("rewards", help="images/s of each learned reward (tiny random checkpoints) and RapidOCR")
    p.add_argument("--size", type=int, default=512, help="input image side (SD3.5 renders 512 or 1024)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=2, help="default-size batches per timed call")
    p.add_argument("--ocr-images", type=int, default=4)
    p.add_argument("--no-ocr", action="store_true")
    p.add_argument("--out", default="results/bench", help="writes OUT/reward_speed.md")
    p.set_defaults(func=cmd_bench_rewards)
    add_bench_gpu(what)
    add_bench_sd3_check(what)


def add_bench_gpu(what: Subparsers) -> None:
    """``diffrl bench gpu`` (:mod:`harness.bench.gpu`): the one prepared GPU run, ≤ 8 minutes on an H100/H200."""
    p = what.add_parser("gpu", help="the card's limit (plain loop, eager and compiled, throughput options), both "
                        "methods' training and sampling at micro-batches 4/8/16 in real TFLOP/s, the tiny DiT on "
                        "the GPU; writes OUT/gpu_bench_<device>.json and .md")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="every section on the CPU with a tiny SD3 (seconds)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="folder of the JSON and Markdown")
    p.add_argument("--micro-batches", type=int, nargs="+", default=None, help="default 4 8 16 (--tiny: 2 4)")
    p.add_argument("--budget-seconds", type=float, default=420.0,
                   help="a section starts only while this much time is left (compiled ones need 150 s)")  # fmt: skip
    p.add_argument("--no-compile", action="store_true", help="skip the compiled sections")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --tiny: eager)")
    p.add_argument("--shapes-suite", default="shapes_full", help="(d): the suite whose cell runs on this device")
    p.add_argument("--shapes-variant", default="diffusion_nft", help="(d): its variant")
    p.add_argument("--cpu-reference", type=Path, default=Path("results/bench/bench_shapes_full.json"),
                   help="(d): the 2-core CPU's figures (diffrl bench methods --suite shapes_full)")  # fmt: skip
    p.set_defaults(func=cmd_bench_gpu)


def add_bench_sd3_check(what: Subparsers) -> None:
    """``diffrl bench sd3-check`` (:mod:`harness.bench.sd3_check`): seconds, memory and TFLOP/s on SD3.5-M's
    shapes (``diffrl bench gpu`` before the one GPU script; docs/sd3.md's Runs 1 and 2)."""
    p = what.add_parser("sd3-check", help="DiffusionNFT and FlowGRPO iterations on SD3.5-Medium's transformer "
                        "(random weights) with LoRA: s/phase, peak memory, TFLOP/s")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="tiny transformer/VAE config (CPU smoke run)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default 512; 64 with --tiny)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="default bf16 (fp32 --tiny)")
    p.add_argument("--vae-dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--t5-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=2, help="prompts per iteration")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="sampling steps of both methods")
    p.add_argument("--nft-batch", type=int, default=4, help="DiffusionNFT train_batch_size")
    p.add_argument("--grpo-batch", type=int, default=2, help="FlowGRPO train_batch_size (x2 with CFG)")
    p.add_argument("--iterations", type=int, default=1, help="measured iterations per method")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the bare forward+backward")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    p.set_defaults(func=cmd_bench_sd3_check)


COMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    add_list, add_pretrain, add_pretrain_reward, add_evaluate, add_train, add_run, add_report, add_serve_reward,
    add_geneval, add_export_lora, add_plot, add_table, add_bench,
)  # fmt: skip


def version() -> str:
    """The installed diffrl's version ("unknown" when run from a checkout that was never installed)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("diffrl")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffrl", description="Online RL for diffusion/flow image models: benchmarks and harness.",
        formatter_class=HelpFormatter,
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level; print tracebacks of user errors")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"diffrl {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=SubcommandParser)
    for add in COMMANDS:
        add(sub)
    return parser


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of a user error (a bad file, an offline download, a missing extra), else None (a bug)."""
    from harness.config import ConfigError
    from harness.data_files import PromptFileError
    from harness.geneval_rules import MetadataError
    from harness.types import RewardError
    from rewards.geneval_detect.folder import FolderError

    if isinstance(error, ModuleNotFoundError):
        package = (error.name or "").split(".")[0]
        if not package or package in OWN_PACKAGES:
            return None
        return (f"needs the package {package!r}, which is not installed; install it (the optional extras of "
                "pyproject.toml: ocr, mmdet, paddle)")  # fmt: skip
    if isinstance(error, ConfigError | PromptFileError | MetadataError | RewardError | FolderError):
        return str(error)
    if isinstance(error, FileNotFoundError):
        return f"{error.strerror or 'no such file'}: {error.filename}" if error.filename else str(error)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user error prints ``diffrl <command>: <message>`` (with -v, its traceback) and exits 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"diffrl {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except (SystemExit, Exception) as error:
        if isinstance(error, SystemExit):  # raise SystemExit("message"): a command's own user error
            message = error.code if isinstance(error.code, str) else None
        else:
            message = user_error_message(error)
        if message is None:
            raise
        if args.verbose:
            traceback.print_exc()
        return _user_error(f"diffrl {args.command}", message)


if __name__ == "__main__":
    sys.exit(main())
