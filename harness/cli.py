"""The ``diffrl`` command line: list, pretrain, evaluate."""

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
    from harness.config import build, parse_overrides
    from harness.optim import OptimConfig
    from harness.trainer import LoopConfig, train, write_jsonl
    from methods import METHODS
    from rewards.shapes import ShapesGenEval

    method_cls = METHODS.get(args.method)
    method_cfg = build(method_cls.Config, parse_overrides(args.set or []), where=args.method)
    loop = LoopConfig(
        iterations=args.iterations, seed=args.seed, eval_every=args.eval_every, budget_fwd_equiv=args.budget
    )
    policy = load_shapes_policy(Path(args.checkpoint) if args.checkpoint else None)
    reward = ShapesGenEval(judgement=args.judgement)
    result = train(args.method, method_cfg, policy, ShapesBenchmark(), reward, loop, OptimConfig(lr=args.lr))
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
    from harness.perf import bench_methods

    print(bench_methods(Path(args.out), args.iterations, args.warmup, args.threads).read_text())
    return 0


def _read_results(path: str):
    import pandas as pd

    if not Path(path).is_file():
        raise SystemExit(f"results table {path} not found (a results.csv written by 'diffrl compare')")
    return pd.read_csv(path)


def cmd_plot(args: argparse.Namespace) -> int:
    from harness.plots import efficiency_curve

    df = _read_results(args.results)
    out = (
        Path(args.out)
        if args.out
        else Path(args.results).parent / f"{args.metric.split('/')[-1]}_vs_{args.unit.split('/')[-1]}"
    )
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
    rows = speedups(df, args.metric, args.unit, target, args.reference)
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
    p_train.set_defaults(func=cmd_train)

    p_cmp = sub.add_parser("compare", help="DiffusionNFT vs FlowGRPO (CFG 4.5 and none) at matched compute")
    p_cmp.add_argument("benchmark", choices=["shapes"])
    p_cmp.add_argument("--iterations", type=int, default=20, help="DiffusionNFT iterations; sets the budget")
    p_cmp.add_argument("--lr", type=float, default=SHAPES_LR)
    p_cmp.add_argument("--seed", type=int, default=0)
    p_cmp.add_argument("--out", default="results/shapes_methods")
    p_cmp.add_argument("--judgement", default="correct", choices=JUDGEMENTS, help=JUDGEMENT_HELP)
    p_cmp.set_defaults(func=cmd_compare)

    p_plot = sub.add_parser("plot", help="efficiency curve (metric vs compute, seed bands) from a results.csv")
    p_plot.add_argument("results", help="a tidy results.csv (one row per evaluation)")
    p_plot.add_argument("--metric", default="eval/overall")
    p_plot.add_argument(
        "--unit", default="compute/fwd_equiv", help="compute/fwd_equiv, compute/flops, compute/wall_seconds, ..."
    )
    p_plot.add_argument("--log-x", action="store_true")
    p_plot.add_argument("--out", default=None, help="output path without suffix (PNG and PDF are written)")
    p_plot.set_defaults(func=cmd_plot)

    p_table = sub.add_parser("table", help="final scores and compute-to-target from a results.csv")
    p_table.add_argument("results")
    p_table.add_argument("--metric", default="eval/overall")
    p_table.add_argument("--unit", default="compute/fwd_equiv")
    p_table.add_argument("--target", type=float, default=None, help="a score to reach")
    p_table.add_argument("--target-variant", default=None, help="or: reach this variant's final mean score")
    p_table.add_argument("--reference", default=None, help="speedups are relative to this variant")
    p_table.add_argument("--latex", action="store_true", help="print the compute-to-target table as LaTeX")
    p_table.set_defaults(func=cmd_table)

    p_bench = sub.add_parser("bench", help="speed and memory benchmarks (not tests)")
    p_bench.add_argument("what", choices=["methods"])
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
