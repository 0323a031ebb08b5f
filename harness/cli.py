"""The ``diffrl`` command line: list, pretrain, pretrain-reward, evaluate, train, compare, run, report, plot, table, bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("diffrl")
JUDGEMENTS = ["correct", "strict", "score"]  # the values of rewards.shapes.Judgement, default first
JUDGEMENT_HELP = (
    "training reward: the official GenEval rule (correct, default on shapes), FlowGRPO's strict rule, "
    "or FlowGRPO's partial-credit score (collapses to empty images on shapes: see the README)"
)
SHAPES_LR = 1e-4  # full fine-tuning of the 2M-parameter shapes model (the official 3e-4 is for LoRA on 2.5B)


def _registries() -> dict[str, object]:
    from benchmarks import BENCHMARKS
    from methods import METHODS
    from rewards import REWARDS

    return {"methods": METHODS, "rewards": REWARDS, "benchmarks": BENCHMARKS}


def cmd_list(args: argparse.Namespace) -> int:
    registry = _registries()[args.kind]
    entries = registry.entries()  # type: ignore[attr-defined]
    if not entries:
        print(f"no {args.kind} registered yet")
    width = max((len(e.key) for e in entries), default=0)
    for entry in entries:
        print(f"{entry.key:<{width}}  {entry.description}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from benchmarks.shapes.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(steps=args.steps, seed=args.seed, save_every=args.save_every)
    out = pretrain(cfg, Path(args.out))
    print(f"wrote {out}")
    return 0


def cmd_pretrain_reward(args: argparse.Namespace) -> int:
    from benchmarks.shapes.train_classifier import ClassifierTrainConfig, measure_report, train_classifier

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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from benchmarks.shapes.benchmark import ShapesBenchmark
    from benchmarks.shapes.checkpoint import load_shapes_policy
    from harness.evaluate import EvalSettings, evaluate_policy
    from harness.images import save_grid
    from harness.samplers import make_sampler

    scales = args.cfg or [1.0]
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    if any(scale < 1.0 for scale in scales):
        raise SystemExit(f"--cfg must be >= 1.0 (1.0 = no guidance), got {scales}")
    if args.json and len(scales) > 1:
        raise SystemExit("--json prints one JSON object: give at most one --cfg")
    policy = load_shapes_policy(Path(args.checkpoint) if args.checkpoint else None)
    benchmark = ShapesBenchmark()
    sampler = make_sampler(args.sampler)
    rows = []
    for scale in scales:
        settings = EvalSettings(num_steps=args.steps, guidance_scale=scale)
        output = evaluate_policy(policy, benchmark, sampler, settings, progress=not args.json)
        scores = {k: round(v, 4) for k, v in output.scores.items()}
        rows.append({"cfg": scale, **scores})
        if args.out:
            save_grid(
                output.images[:: benchmark.images_per_prompt], Path(args.out) / f"samples_cfg{scale:g}.png", columns=16
            )
        if args.json:
            print(json.dumps(scores))
        else:
            print(f"shapes eval: {len(output.prompts)} images, {args.sampler} {args.steps} steps, cfg {scale:g}")
            for key in benchmark.metrics:
                print(f"  {key:<16} {scores[key]:.4f}")
    if args.out:
        _write_eval_tables(Path(args.out), rows, benchmark.metrics, args)
    return 0


def _write_eval_tables(
    out: Path, rows: list[dict[str, float]], metrics: Sequence[str], args: argparse.Namespace
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    command = f"diffrl evaluate shapes --sampler {args.sampler} --steps {args.steps} "
    command += " ".join(f"--cfg {row['cfg']:g}" for row in rows)
    command += f" --checkpoint {args.checkpoint}" if args.checkpoint else ""
    (out / "scores.json").write_text(
        json.dumps(
            {
                "checkpoint": args.checkpoint or "committed base",
                "sampler": args.sampler,
                "steps": args.steps,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    header = "| cfg | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    lines += ["| " + f"{row['cfg']:g} | " + " | ".join(f"{row[m]:.3f}" for m in metrics) + " |" for row in rows]
    (out / "scores.md").write_text("\n".join(lines) + f"\n\nMade by `{command} --out {out}`.\n")


def cmd_train(args: argparse.Namespace) -> int:
    from benchmarks.shapes.benchmark import ShapesBenchmark
    from benchmarks.shapes.checkpoint import load_shapes_policy
    from harness.budget import Budget
    from harness.config import build, parse_overrides
    from harness.distributed import from_environment
    from harness.optim import OptimConfig
    from harness.trainer import LoopConfig, train, write_jsonl
    from methods import METHODS
    from rewards import REWARDS
    from rewards.shapes import ShapesGenEval

    method_cls = METHODS.get(args.method)
    method_cfg = build(method_cls.Config, parse_overrides(args.set or []), where=args.method)
    loop = LoopConfig(
        iterations=args.iterations,
        seed=args.seed,
        eval_every=args.eval_every,
        budget=Budget(unit="fwd_equiv", amount=args.budget, eval_at=()) if args.budget else None,
    )
    policy = load_shapes_policy(Path(args.checkpoint) if args.checkpoint else None)
    reward = ShapesGenEval(judgement=args.judgement) if args.reward == "shapes_geneval" else REWARDS.get(args.reward)()
    processes = from_environment()  # several processes under accelerate launch
    result = train(args.method, method_cfg, policy, ShapesBenchmark(), reward, loop, OptimConfig(lr=args.lr),
                   processes=processes)  # fmt: skip
    processes.close()
    if not processes.is_main:
        return 0
    for row in result.evaluations:
        print(
            f"iteration {row['iteration']:>4}  fwd_equiv {row['compute/fwd_equiv']:>10,}  overall {row['eval/overall']:.3f}"
        )
    if args.out:
        write_jsonl(Path(args.out) / "log.jsonl", result.iterations + result.evaluations)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.compare import compare

    table = compare(Path(args.out), args.iterations, args.lr, args.seed, args.judgement)
    print(table.read_text())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from harness.perf import bench_methods, bench_overhead

    if args.what == "overhead":
        print(bench_overhead(args.suite or "shapes_quick", Path(args.out), args.threads).read_text())
    else:
        print(bench_methods(Path(args.out), args.iterations, args.warmup, args.threads, args.suite).read_text())
    return 0


def _read_results(path: str):
    from harness.store import read_results

    try:
        return read_results(Path(path))
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None


def cmd_run(args: argparse.Namespace) -> int:
    from harness.config import ConfigError
    from harness.distributed import from_environment
    from harness.report import write_report
    from harness.runner import run_suite
    from harness.suite import load_suite

    try:
        suite = load_suite(args.suite)
    except ConfigError as error:
        print(f"invalid suite: {error}", file=sys.stderr)
        return 2
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


def cmd_serve_reward(args: argparse.Namespace) -> int:
    from harness.config import ConfigError, parse_overrides
    from rewards.server import serve_reward

    try:
        serve_reward(args.name, args.host, args.port, **parse_overrides(args.set or []))
    except (KeyError, ConfigError) as error:
        raise SystemExit(f"cannot serve reward {args.name!r}: {error}") from None
    return 0


def cmd_geneval(args: argparse.Namespace) -> int:
    from rewards.geneval_detect.folder import FolderError, score_image_folder

    out = Path(args.out) if args.out else Path(args.image_dir) / "geneval_results"
    try:
        summary = score_image_folder(
            Path(args.image_dir), out, args.backend, detector_path=args.detector, detector_config=args.detector_config,
            clip_path=args.clip, device=args.device, batch_size=args.batch_size, rgb_as_bgr=args.rgb_as_bgr,
            class_names=args.class_names,
        )  # fmt: skip
    except FolderError as error:
        raise SystemExit(str(error)) from None
    print(summary.table())
    print(f"{summary.n_images} images of {summary.n_prompts} prompts, backend {summary.backend}; wrote {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import write_report

    folder = Path(args.folder)
    if not (folder / "suite.yaml").is_file():
        raise SystemExit(f"{folder} is not a suite folder written by 'diffrl run' (no suite.yaml)")
    print(f"wrote {write_report(folder)}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from harness.plots import efficiency_curve

    df = _read_results(args.results)
    folder = Path(args.results) if Path(args.results).is_dir() else Path(args.results).parent
    out = Path(args.out) if args.out else folder / f"{args.metric.split('/')[-1]}_vs_{args.unit.split('/')[-1]}"
    for path in efficiency_curve(df, args.metric, args.unit, out, log_x=args.log_x):
        print(f"wrote {path}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from harness.tables import final_scores, final_scores_markdown, speedup_latex, speedup_markdown, speedups

    df = _read_results(args.results)
    metrics = [c for c in df.columns if c.startswith("eval/")]
    print(final_scores_markdown(final_scores(df, metrics, args.unit), metrics))
    if args.target is None and args.target_variant is None:
        return 0
    if args.reference is None:
        raise SystemExit("--reference VARIANT is needed for compute-to-target")
    target = args.target
    if target is None:
        scores = final_scores(df, [args.metric], args.unit)
        if args.target_variant not in scores.index:
            raise SystemExit(f"--target-variant {args.target_variant!r} not in {list(scores.index)}")
        target = float(scores.loc[args.target_variant, f"{args.metric}/mean"])
    rows = speedups(df, args.metric, args.unit, target, args.reference, mode="per_seed" if args.per_seed else "auto")
    print((speedup_latex if args.latex else speedup_markdown)(rows, args.unit, target, args.reference))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffrl", description="Online RL for diffusion/flow image models: benchmarks and harness."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p_list = sub.add_parser("list", help="list registered methods, rewards or benchmarks")
    p_list.add_argument("kind", choices=["methods", "rewards", "benchmarks"])
    p_list.set_defaults(func=cmd_list)

    p_pre = sub.add_parser("pretrain", help="pretrain a benchmark's base model (deterministic)")
    p_pre.add_argument("benchmark", choices=["shapes"])
    p_pre.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the committed base's)")
    p_pre.add_argument("--seed", type=int, default=0)
    p_pre.add_argument("--save-every", type=int, default=0, help="also save every N steps into OUT/step_N")
    p_pre.add_argument("--out", default="results/pretrain/shapes_base", help="checkpoint folder to write")
    p_pre.set_defaults(func=cmd_pretrain)

    p_prew = sub.add_parser(
        "pretrain-reward", help="train the shapes world's differentiable reward (shapes_classifier; deterministic)"
    )
    p_prew.add_argument("--out", default="results/pretrain/shapes_classifier", help="asset folder to write")
    p_prew.add_argument(
        "--steps",
        dest="train_steps",
        metavar="N",
        type=int,
        default=None,
        help="optimizer steps (default: the committed asset's)",
    )
    p_prew.add_argument("--seed", type=int, default=0)
    p_prew.add_argument("--base-samples", type=int, default=None, help="base-model samples mixed into training")
    p_prew.add_argument("--measure-only", action="store_true", help="only measure agreement of the asset at --out")
    p_prew.add_argument("--no-measure", action="store_true", help="skip the agreement measurement (OUT/agreement.md)")
    p_prew.set_defaults(func=cmd_pretrain_reward)

    p_eval = sub.add_parser("evaluate", help="evaluate a checkpoint on a benchmark's held-out eval set")
    p_eval.add_argument("benchmark", choices=["shapes"])
    p_eval.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the committed base)")
    p_eval.add_argument("--sampler", default="euler", choices=["euler", "dpm2"])
    p_eval.add_argument("--steps", type=int, default=10, help="sampling steps")
    p_eval.add_argument("--cfg", type=float, action="append", help="CFG scale (1 = none); repeat to compare scales")
    p_eval.add_argument("--out", default=None, help="write scores.json, scores.md and sample grids into this folder")
    p_eval.add_argument("--json", action="store_true", help="print one JSON object: overall and per-task scores")
    p_eval.set_defaults(func=cmd_evaluate)

    p_train = sub.add_parser("train", help="train one method from a checkpoint on a benchmark")
    p_train.add_argument("benchmark", choices=["shapes"])
    p_train.add_argument("--method", required=True, help="a registered method (diffrl list methods)")
    p_train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of the method's config")
    p_train.add_argument("--iterations", type=int, default=20)
    p_train.add_argument("--budget", type=int, default=0, help="stop once this many forward-equivalents are spent")
    p_train.add_argument("--lr", type=float, default=SHAPES_LR, help="AdamW learning rate (full fine-tuning)")
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--eval-every", type=int, default=0)
    p_train.add_argument("--checkpoint", default=None, help="start from this checkpoint (default: the committed base)")
    p_train.add_argument("--out", default=None, help="write log.jsonl (iterations and evaluations) here")
    p_train.add_argument("--judgement", default="correct", choices=JUDGEMENTS, help=JUDGEMENT_HELP)
    p_train.add_argument(
        "--reward", default="shapes_geneval", help="the training reward (a registered name; draft needs a differentiable "
        "one, e.g. shapes_classifier); the eval metric stays the shapes GenEval rules"
    )  # fmt: skip
    p_train.set_defaults(func=cmd_train)

    p_cmp = sub.add_parser("compare", help="DiffusionNFT vs FlowGRPO (CFG 4.5 and none) at matched compute")
    p_cmp.add_argument("benchmark", choices=["shapes"])
    p_cmp.add_argument("--iterations", type=int, default=20, help="DiffusionNFT iterations; sets the budget")
    p_cmp.add_argument("--lr", type=float, default=SHAPES_LR)
    p_cmp.add_argument("--seed", type=int, default=0)
    p_cmp.add_argument("--out", default="results/shapes_methods")
    p_cmp.add_argument("--judgement", default="correct", choices=JUDGEMENTS, help=JUDGEMENT_HELP)
    p_cmp.set_defaults(func=cmd_compare)

    p_run = sub.add_parser("run", help="run (or resume) a comparison suite; writes results/<suite>/")
    shipped = sorted(p.stem for p in (Path(__file__).parent / "suites").glob("*.yaml"))  # harness.suite imports torch
    p_run.add_argument("suite", help=f"a suite .yaml file or a built-in suite name ({', '.join(shipped)})")
    p_run.add_argument("--out", default=None, help="suite folder (default: results/<suite name>)")
    p_run.add_argument("--check", action="store_true", help="validate the suite and exit")
    p_run.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p_run.add_argument("--no-progress", action="store_true", help="no progress bars (evaluation lines stay)")
    p_run.set_defaults(func=cmd_run)

    p_report = sub.add_parser("report", help="rebuild a suite folder's README, plots and tables")
    p_report.add_argument("folder", help="a folder written by 'diffrl run'")
    p_report.set_defaults(func=cmd_report)

    p_serve = sub.add_parser("serve-reward", help="serve a registered reward over HTTP (for other processes/hosts)")
    p_serve.add_argument("name", help="a registered reward (diffrl list rewards)")
    p_serve.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to accept other hosts)")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument("--set", action="append", metavar="KEY=VALUE", help="an option of the reward's factory")
    p_serve.set_defaults(func=cmd_serve_reward)

    p_gen = sub.add_parser("geneval", help="score a GenEval image folder (<index>/metadata.jsonl, <index>/samples/)")
    p_gen.add_argument("image_dir", help="a folder laid out as GenEval's generation script writes it")
    p_gen.add_argument("--out", default=None, help="results.jsonl and summary.json (default IMAGE_DIR/geneval_results)")
    p_gen.add_argument(
        "--backend", default="mmdet", choices=["mmdet", "hf"], help="mmdet: the official detector (reproduces "
        "published numbers); hf: transformers' Mask2Former"
    )  # fmt: skip
    p_gen.add_argument("--detector", default=None, help="detector checkpoint (file or folder; hf: a model id too)")
    p_gen.add_argument("--detector-config", default=None, help="mmdet config (default: GenEval's Mask2Former Swin-S)")
    p_gen.add_argument("--clip", default=None, help="CLIP ViT-L/14 for colours (default openai/clip-vit-large-patch14)")
    p_gen.add_argument(
        "--class-names", default=None, help="GenEval's object_names.txt (default: downloaded once and cached)"
    )
    p_gen.add_argument("--device", default="cpu")
    p_gen.add_argument("--batch-size", type=int, default=8)
    p_gen.add_argument("--rgb-as-bgr", action="store_true", help="reproduce FlowGRPO/DiffusionNFT's channel swap")
    p_gen.set_defaults(func=cmd_geneval)

    p_plot = sub.add_parser("plot", help="efficiency curve (metric vs compute, seed bands) from a results.csv")
    p_plot.add_argument("results", help="a results table (.csv or .parquet) or a suite folder")
    p_plot.add_argument("--metric", default="eval/overall")
    p_plot.add_argument(
        "--unit", default="compute/fwd_equiv", help="compute/fwd_equiv, compute/flops, compute/wall_seconds, ..."
    )
    p_plot.add_argument("--log-x", action="store_true")
    p_plot.add_argument("--out", default=None, help="output path without suffix (PNG and PDF are written)")
    p_plot.set_defaults(func=cmd_plot)

    p_table = sub.add_parser("table", help="final scores and compute-to-target from a results.csv")
    p_table.add_argument("results", help="a results table (.csv or .parquet) or a suite folder")
    p_table.add_argument("--metric", default="eval/overall")
    p_table.add_argument("--unit", default="compute/fwd_equiv")
    p_table.add_argument("--target", type=float, default=None, help="a score to reach")
    p_table.add_argument("--target-variant", default=None, help="or: reach this variant's final mean score")
    p_table.add_argument("--reference", default=None, help="speedups are relative to this variant")
    p_table.add_argument("--latex", action="store_true", help="print the compute-to-target table as LaTeX")
    p_table.add_argument(
        "--per-seed",
        action="store_true",
        help="compute-to-target per seed (default for suites: on the seed-mean curve)",
    )
    p_table.set_defaults(func=cmd_table)

    p_bench = sub.add_parser("bench", help="speed and memory benchmarks (not tests)")
    p_bench.add_argument(
        "what", choices=["methods", "overhead"], help="methods: s/iteration and memory; overhead: a suite's time split"
    )
    p_bench.add_argument(
        "--suite",
        default=None,
        help="methods: measure this suite's variants at its geometry and estimate its run time; "
        "overhead: the suite run from scratch (default shapes_quick)",
    )
    p_bench.add_argument("--iterations", type=int, default=2, help="timed iterations per method")
    p_bench.add_argument("--warmup", type=int, default=1)
    p_bench.add_argument("--threads", type=int, default=2)
    p_bench.add_argument("--out", default="results/bench")
    p_bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if getattr(args, "steps", 0) is None:
        from benchmarks.shapes.pretrain import PretrainConfig

        args.steps = PretrainConfig().steps
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
