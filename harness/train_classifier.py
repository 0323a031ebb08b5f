"""Training and measurement of the shapes classifier behind the differentiable ``shapes_classifier`` reward.

Labels are the rule detector's own output (:func:`harness.shapes_world.detect.detect` on the image
rounded to uint8, exactly as :func:`harness.shapes_world.judge.judge_images` sees it), so any image can be a
training image: renders of grammar prompts, edited renders (one object dropped, added, recoloured
or reshaped), random clutter (0–7 objects of 4–12 px that may touch and merge), and a pool of
samples of the committed base model (Euler and Flow-SDE, 1–10 steps, CFG 1 and 4.5, 10% empty
prompts), all with random flips, max-composites of two images, Gaussian noise, blur and colour
gains. Training is deterministic from ``seed`` on the CPU (fixed thread count).

After training, the soft ``relative_position`` temperature is fitted on fresh held-out images
(minimum binary cross-entropy against the rule's relation), and the asset is written as
config.json + model.safetensors + model.safetensors.sha256.

``diffrl pretrain-reward --out DIR`` trains and then measures; ``diffrl pretrain-reward --out DIR
--measure-only`` or ``python -m harness.train_classifier --measure [DIR]`` only measure:
they print, and write to ``DIR/agreement.md``, the agreement of the reward with
``ShapesGenEval(judgement="score")`` on renders and on the committed base model's eval samples
(:func:`measure_agreement`), and a pixel-space gradient-ascent check (:func:`pixel_ascent`).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.shapes.checkpoint import BASE_CHECKPOINT
from benchmarks.shapes.pretrain import sha256_of
from benchmarks.shapes.prompts import sample_prompts
from harness.geneval_rules import GenEvalRules, ScoreVariant, relative_position
from harness.images import to_uint8
from harness.seeding import generator
from harness.shapes_world.detect import detect
from harness.shapes_world.render import PlacedObject, draw, layout
from harness.shapes_world.world import COLORS, IMAGE_SIZE, SHAPES
from harness.types import Prompt
from rewards.shapes_classifier import (
    CLASSIFIER_CHECKPOINT,
    Beliefs,
    ClassifierConfig,
    RelationCalibration,
    ShapesClassifier,
    count_distribution,
    expected_partial_score,
    save_classifier,
    soft_relation,
)

log = logging.getLogger(__name__)
RULES = GenEvalRules()


@dataclass(frozen=True, kw_only=True)
class ClassifierTrainConfig:
    """Budget, data mixture and optimiser; the defaults produce the committed asset."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 1  # fixed so that the CPU result does not depend on the machine's core count
    base_samples: int = 2048  # pool of committed-base samples mixed into training (0: procedural images only)
    mixture: tuple[float, float, float, float] = (0.15, 0.1, 0.2, 0.55)  # renders, edited, clutter, base samples
    geometry_weight: float = 0.1  # weight of the centre/extent smooth-L1 (pixels) beside the cross-entropies
    calibration_images: int = 1024


# ----------------------------------------------------------------------------- labels from the rule detector


def detector_targets(images: Tensor, max_count: int) -> dict[str, Tensor]:
    """The rule detector's output as training targets: per 4-pixel cell (8×8 grid) and class, whether a
    detection's box centre lies there (score > 0.3, > 0.9), its colour, centre and extent; per class,
    the counts, and the colour/centre/extent of a class's only loose detection (``single``)."""
    n, n_shapes, cells = images.shape[0], len(SHAPES), 64
    targets = {
        "count_loose": torch.zeros(n, n_shapes, dtype=torch.long),
        "count_tight": torch.zeros(n, n_shapes, dtype=torch.long),
        "single": torch.zeros(n, n_shapes, dtype=torch.bool),
        "color": torch.zeros(n, n_shapes, dtype=torch.long),
        "centre": torch.zeros(n, n_shapes, 2),
        "extent": torch.zeros(n, n_shapes, 2),
        "cell_loose": torch.zeros(n, n_shapes, cells),
        "cell_tight": torch.zeros(n, n_shapes, cells),
        "cell_color": torch.full((n, cells), -100, dtype=torch.long),  # -100: cross_entropy's ignore_index
        "cell_centre": torch.zeros(n, n_shapes, 2, cells),
        "cell_extent": torch.zeros(n, n_shapes, 2, cells),
    }
    colors = list(COLORS)
    for i, image in enumerate(to_uint8(images)):
        for cls, dets in detect(image).items():
            k = SHAPES.index(cls)
            loose = [d for d in dets if d.score > RULES.threshold]
            targets["count_loose"][i, k] = min(len(loose), max_count)
            targets["count_tight"][i, k] = min(sum(d.score > RULES.counting_threshold for d in dets), max_count)
            for d in loose:
                x1, y1, x2, y2 = d.box
                centre, extent = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2]), torch.tensor([x2 - x1, y2 - y1])
                j = min(int(centre[1]) // 4, 7) * 8 + min(int(centre[0]) // 4, 7)
                targets["cell_loose"][i, k, j] = 1.0
                targets["cell_tight"][i, k, j] = float(d.score > RULES.counting_threshold)
                targets["cell_color"][i, j] = colors.index(d.color)  # type: ignore[arg-type]  # always labelled
                targets["cell_centre"][i, k, :, j], targets["cell_extent"][i, k, :, j] = centre, extent
                if len(loose) == 1:
                    targets["single"][i, k] = True
                    targets["color"][i, k] = colors.index(d.color)  # type: ignore[arg-type]
                    targets["centre"][i, k], targets["extent"][i, k] = centre, extent
    return targets


def rule_beliefs(images: Tensor, max_count: int = 8) -> Beliefs:
    """One-hot beliefs from the rule detector: with temperature 0 the soft score is the clipped rule score."""
    t = detector_targets(images, max_count)
    color = F.one_hot(t["color"], len(COLORS)).float() * t["single"][..., None]
    return Beliefs(
        count_loose=F.one_hot(t["count_loose"], max_count + 1).float(),
        count_tight=F.one_hot(t["count_tight"], max_count + 1).float(),
        color=color,
        centre=t["centre"],
        extent=t["extent"],
    )


# ----------------------------------------------------------------------------- training images


def _random_object(rng: np.random.Generator, sizes: tuple[int, int] = (4, 12)) -> PlacedObject:
    size = int(rng.integers(sizes[0], sizes[1] + 1))
    x1, y1 = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
    return PlacedObject(SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))],
                        (x1, y1, x1 + size, y1 + size))  # fmt: skip


def grammar_scene(metadata: dict[str, Any], rng: np.random.Generator, edit: bool) -> np.ndarray:
    """A render of a grammar prompt; with ``edit``, one object dropped, added, recoloured or reshaped."""
    objects = layout(metadata, rng)
    if edit:
        i, kind = int(rng.integers(len(objects))), int(rng.integers(4))
        extra = _random_object(rng, (7, 11))
        if kind == 0:
            objects.pop(i)
        elif kind == 1:
            objects.append(extra)
        elif kind == 2:
            objects[i] = PlacedObject(objects[i].shape, extra.color, objects[i].box)
        else:
            objects[i] = PlacedObject(extra.shape, objects[i].color, objects[i].box)
    return draw(objects)


def clutter_scene(rng: np.random.Generator) -> np.ndarray:
    """0–7 random objects anywhere: they may touch, overlap and merge into one component."""
    return draw([_random_object(rng) for _ in range(int(rng.integers(0, 8)))])


def base_sample_pool(n: int, seed: int, batch_size: int = 64) -> Tensor:
    """``n`` samples (N, 3, 32, 32) in [0, 1] of the committed base model over mixed samplers, steps and CFG."""
    from benchmarks.shapes.checkpoint import load_shapes_policy
    from harness.policy import unconditional
    from harness.rollout import rollout
    from harness.samplers import flow_schedule, make_sampler

    policy = load_shapes_policy()
    rng = np.random.default_rng([seed, 1])
    settings = [(s, k, w) for s in ("euler", "flow_sde") for k in (1, 2, 4, 10) for w in (1.0, 4.5)]
    images = []
    for chunk, start in enumerate(range(0, n, batch_size)):
        size = min(batch_size, n - start)
        sampler_name, steps, scale = settings[int(rng.integers(len(settings)))]
        texts = [md["prompt"] if keep else "" for md, keep in zip(sample_prompts(rng, size), rng.random(size) > 0.1,
                                                                   strict=True)]  # fmt: skip
        noise = torch.randn((size, *policy.sample_shape), generator=generator(seed, "classifier-pool", chunk))
        with torch.no_grad():
            traj = rollout(
                policy, make_sampler(sampler_name), policy.encode(texts), noise, flow_schedule(steps),
                guidance_scale=scale, uncond=unconditional(policy, size, scale),
                generator=generator(seed, "classifier-pool-sampler", chunk),
            )  # fmt: skip
        images.append(policy.decode(traj.x0))
    return torch.cat(images) if images else torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)


def augment(images: Tensor, gen: torch.Generator) -> Tensor:
    """Flips, max-composites, Gaussian noise, 3×3 blur and per-channel gains, each per image at random."""
    n = images.shape[0]

    def pick(p: float) -> Tensor:
        return torch.rand(n, generator=gen) < p

    x = torch.where(pick(0.5)[:, None, None, None], images.flip(-1), images)
    x = torch.where(pick(0.15)[:, None, None, None], x.flip(-2), x)
    partner = x[torch.randperm(n, generator=gen)]
    x = torch.where(pick(0.15)[:, None, None, None], torch.maximum(x, partner), x)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(x, kernel, padding=1, groups=3)
    alpha = torch.rand(n, 1, 1, 1, generator=gen) * pick(0.2)[:, None, None, None]
    x = (1 - alpha) * x + alpha * blurred
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.4 * pick(0.3)[:, None, None, None]
    sigma = torch.rand(n, 1, 1, 1, generator=gen) * 0.12 * pick(0.3)[:, None, None, None]
    return (x * gain + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def training_batch(
    cfg: ClassifierTrainConfig, rng: np.random.Generator, gen: torch.Generator, pool: Tensor, n: int
) -> Tensor:
    """One batch of ``n`` images (N, 3, 32, 32) in [0, 1] drawn from the mixture, then augmented."""
    weights = np.array(cfg.mixture if len(pool) else (*cfg.mixture[:3], 0.0))
    sources = rng.choice(4, size=n, p=weights / weights.sum())
    prompts = iter(sample_prompts(rng, int((sources < 2).sum())))
    arrays = []
    for source in sources:
        if source == 3:
            arrays.append(pool[int(rng.integers(len(pool)))])
            continue
        image = grammar_scene(next(prompts), rng, edit=source == 1) if source < 2 else clutter_scene(rng)
        arrays.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    return augment(torch.stack(arrays), gen)


# ----------------------------------------------------------------------------- training


def classifier_loss(
    model: ShapesClassifier, images: Tensor, targets: dict[str, Tensor], geometry_weight: float
) -> Tensor:
    """Per-cell BCE (summed over cells), the NLL of the true counts under the Poisson-binomial counts,
    the colour cross-entropy at occupied cells, and smooth-L1 (pixels) for centres and extents."""
    cells = model(images)
    loss = images.new_zeros(())
    for level in ("loose", "tight"):
        bce = F.binary_cross_entropy_with_logits(cells[level], targets[f"cell_{level}"], reduction="none")
        counts = count_distribution(torch.sigmoid(cells[level]), model.cfg.max_count)
        nll = -counts.gather(-1, targets[f"count_{level}"][..., None]).clamp(min=1e-6).log()
        loss = loss + bce.sum(-1).mean() + nll.mean()
    loss = loss + F.cross_entropy(cells["color"], targets["cell_color"], ignore_index=-100)
    occupied = targets["cell_loose"].bool()[:, :, None, :].expand_as(cells["centre"])
    if occupied.any():
        geometry = F.smooth_l1_loss(cells["centre"][occupied], targets["cell_centre"][occupied])
        geometry = geometry + F.smooth_l1_loss(cells["extent"][occupied], targets["cell_extent"][occupied])
        loss = loss + geometry_weight * geometry
    return loss


def calibrate_relation(model: ShapesClassifier, images: Tensor, sharpness: float = 2.0) -> RelationCalibration:
    """Fit the soft relation's temperature: minimum BCE against GenEval's rule on every single-single pair."""
    targets = detector_targets(images, model.cfg.max_count)
    with torch.no_grad():
        beliefs = model.beliefs(images)

    def box(i: int, k: int) -> tuple[float, float, float, float]:
        low, high = (
            targets["centre"][i, k] - targets["extent"][i, k] / 2,
            targets["centre"][i, k] + targets["extent"][i, k] / 2,
        )
        return (*low.tolist(), *high.tolist())  # type: ignore[return-value]

    rows = []
    for i in range(images.shape[0]):
        singles = targets["single"][i].nonzero().flatten().tolist()
        rows += [(i, a, b, relative_position(box(i, a), box(i, b), RULES.position_threshold))
                 for a in singles for b in singles if a != b]  # fmt: skip
    best = (math.inf, RelationCalibration(sharpness=sharpness))
    for temperature in (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0):
        calib = RelationCalibration(sharpness=sharpness, temperature=temperature)
        losses = []
        for i, a, b, found in rows:
            for relation in ("left of", "right of", "above", "below"):
                p = soft_relation(beliefs.centre[i, a], beliefs.extent[i, a], beliefs.centre[i, b],
                                  beliefs.extent[i, b], relation, calib).clamp(1e-6, 1 - 1e-6)  # fmt: skip
                losses.append(-torch.log(p if relation in found else 1 - p).item())
        loss = float(np.mean(losses)) if losses else math.inf
        log.info("relation temperature %.2f: BCE %.4f over %d pairs", temperature, loss, len(rows))
        if loss < best[0]:
            best = (loss, calib)
    return best[1]


def train_classifier(cfg: ClassifierTrainConfig, out_dir: Path, model_cfg: ClassifierConfig | None = None) -> Path:
    """Train from scratch, calibrate the relation temperature, and write the asset folder; returns its path."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    model = ShapesClassifier(model_cfg or ClassifierConfig())
    pool = base_sample_pool(cfg.base_samples, cfg.seed)
    rng, gen = np.random.default_rng([cfg.seed, 2]), generator(cfg.seed, "classifier-augment")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(s / cfg.steps, 1.0))),
    )
    for step in range(1, cfg.steps + 1):
        images = training_batch(cfg, rng, gen, pool, cfg.batch_size)
        loss = classifier_loss(model, images, detector_targets(images, model.cfg.max_count), cfg.geometry_weight)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"classifier loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == cfg.steps:
            log.info("step %d/%d loss %.4f (%.0f s)", step, cfg.steps, loss.item(), time.perf_counter() - started)
    model.eval()
    held_out_rng, held_out_gen = np.random.default_rng([cfg.seed, 3]), generator(cfg.seed, "classifier-calibrate")
    calib = calibrate_relation(model, training_batch(cfg, held_out_rng, held_out_gen, pool, cfg.calibration_images))
    extra = {
        "train": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "relation": asdict(calib),
        "base_checkpoint_sha256": sha256_of(BASE_CHECKPOINT / "model.safetensors") if cfg.base_samples else None,
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    out = save_classifier(model, out_dir, extra)
    log.info("saved %s in %.0f s (relation temperature %.2f)", out, time.perf_counter() - started, calib.temperature)
    return out


# ----------------------------------------------------------------------------- agreement with the rule judge


def _agreement_rows(
    name: str, soft: Tensor, rule: Tensor, clipped: Tensor, prompts: Sequence[Prompt]
) -> list[dict[str, object]]:
    tags = [p.tag for p in prompts]
    rows = []
    for tag in [*dict.fromkeys(tags), "all"]:
        mask = torch.tensor([tag in ("all", t) for t in tags])
        s, r, c = soft[mask].double(), rule[mask].double(), clipped[mask].double()

        def pearson(a: Tensor, b: Tensor) -> float:
            return float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")

        rows.append({
            "set": name, "task": tag, "n": int(mask.sum()), "rule": float(r.mean()), "clipped": float(c.mean()),
            "soft": float(s.mean()),
            "pearson": pearson(s, r), "mad": float((s - r).abs().mean()),
            "pearson_clipped": pearson(s, c), "mad_clipped": float((s - c).abs().mean()),
        })  # fmt: skip
    return rows


def measure_agreement(
    directory: Path | None = None, *, score_variant: ScoreVariant = "flowgrpo", renders_per_prompt: int = 4
) -> list[dict[str, object]]:
    """Soft score vs ``ShapesGenEval(judgement="score")`` (raw, and with its count terms clipped at 0 as the proxy's).

    Sets: renders of the 96 eval prompts (half of their own metadata, half of another prompt of the
    same task, so that the rule score varies), and the committed base model's 384 eval samples
    (10-step Euler, the benchmark's eval noise) without CFG and with CFG 4.5.
    """
    from benchmarks.shapes.benchmark import ShapesBenchmark
    from benchmarks.shapes.checkpoint import load_shapes_policy
    from harness.evaluate import EvalSettings, evaluate_policy
    from harness.samplers import make_sampler
    from harness.shapes_world.render import render
    from rewards.shapes import ShapesGenEval
    from rewards.shapes_classifier import ShapesClassifierReward

    reward = ShapesClassifierReward(directory, score_variant=score_variant)
    judge = ShapesGenEval(judgement="score", score_variant=score_variant)
    benchmark = ShapesBenchmark()
    prompts = benchmark.eval_prompts()
    rng = np.random.default_rng(benchmark.eval_seed)
    sets: dict[str, tuple[Tensor, list[Prompt]]] = {}
    rendered, expanded = [], []
    for i, prompt in enumerate(prompts):
        same_task = [j for j, q in enumerate(prompts) if q.tag == prompt.tag and j != i]
        for k in range(renders_per_prompt):
            source = prompt if k % 2 == 0 else prompts[same_task[int(rng.integers(len(same_task)))]]
            rendered.append(torch.from_numpy(render(source.metadata, rng)).permute(2, 0, 1).float() / 255)
            expanded.append(prompt)
    sets["renders (own or another prompt)"] = (torch.stack(rendered), expanded)
    policy = load_shapes_policy()
    for scale in (1.0, 4.5):
        output = evaluate_policy(policy, benchmark, make_sampler("euler"), EvalSettings(guidance_scale=scale),
                                 progress=False)  # fmt: skip
        assert output.images is not None, "evaluate_policy runs in this one process, which holds every image"
        sets[f"base samples, CFG {scale:g}"] = (output.images, output.prompts)
    rows = []
    exact = RelationCalibration(temperature=0.0)
    for name, (images, batch_prompts) in sets.items():
        with torch.no_grad():
            soft = reward(images, batch_prompts)
        rule = judge(images, batch_prompts)
        beliefs = rule_beliefs(images)
        clipped = torch.stack([expected_partial_score(beliefs, i, p.metadata, score_variant, exact)
                               for i, p in enumerate(batch_prompts)])  # fmt: skip
        rows += _agreement_rows(name, soft, rule, clipped, batch_prompts)
    return rows


def agreement_markdown(rows: Sequence[dict[str, object]]) -> str:
    """The agreement table: per set and task, mean rule/soft scores, Pearson r and mean |soft − rule|."""
    lines = [
        "| set | task | n | rule | clipped rule | soft | Pearson r | MAD | Pearson r (clipped) | MAD (clipped) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['set']} | {r['task']} | {r['n']} | {r['rule']:.3f} | {r['clipped']:.3f} | {r['soft']:.3f} "
                     f"| {r['pearson']:.3f} "
                     f"| {r['mad']:.3f} | {r['pearson_clipped']:.3f} | {r['mad_clipped']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def pixel_ascent(directory: Path | None = None, steps: int = 60, lr: float = 0.01) -> dict[str, float]:
    """Is the gradient useful, not only non-zero? Adam ascent of the proxy on the pixels of the committed
    base's 384 eval samples (CFG 1), judged by the rules before and after."""
    from benchmarks.shapes.benchmark import ShapesBenchmark
    from benchmarks.shapes.checkpoint import load_shapes_policy
    from harness.evaluate import EvalSettings, evaluate_policy
    from harness.samplers import make_sampler
    from rewards.shapes import ShapesGenEval
    from rewards.shapes_classifier import ShapesClassifierReward

    reward, score, correct = ShapesClassifierReward(directory), ShapesGenEval("score"), ShapesGenEval("correct")
    output = evaluate_policy(load_shapes_policy(), ShapesBenchmark(), make_sampler("euler"), EvalSettings(),
                             progress=False)  # fmt: skip
    assert output.images is not None, "evaluate_policy runs in this one process, which holds every image"
    images, prompts = output.images, output.prompts
    pixels = images.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([pixels], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        (-reward(pixels.clamp(0, 1), prompts).sum()).backward()
        optimizer.step()
    after = pixels.detach().clamp(0, 1)
    with torch.no_grad():
        soft = reward(images, prompts).mean().item(), reward(after, prompts).mean().item()
    return {
        "soft_before": soft[0], "soft_after": soft[1],
        "rule_before": score(images, prompts).mean().item(), "rule_after": score(after, prompts).mean().item(),
        "correct_before": correct(images, prompts).mean().item(), "correct_after": correct(after, prompts).mean().item(),
        "mean_abs_change": (after - images).abs().mean().item(), "steps": steps, "lr": lr,
    }  # fmt: skip


def measure_report(directory: Path | None = None) -> str:
    """The agreement table plus the pixel-ascent check, as written to ``agreement.md``."""
    table = agreement_markdown(measure_agreement(directory))
    a = pixel_ascent(directory)
    return (
        f"{table}\nPixel-space gradient ascent on the proxy (Adam, lr {a['lr']:g}, {a['steps']} steps) of the committed "
        f"base's 384 eval samples (CFG 1): soft {a['soft_before']:.3f} → {a['soft_after']:.3f}, rule partial score "
        f"{a['rule_before']:.3f} → {a['rule_after']:.3f}, GenEval accuracy {a['correct_before']:.3f} → "
        f"{a['correct_after']:.3f}, mean |Δpixel| {a['mean_abs_change']:.3f}.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs="?", const=str(CLASSIFIER_CHECKPOINT), default=None, metavar="DIR",
                        help="measure agreement of an asset folder with the rule judge (default: the committed one)")  # fmt: skip
    parser.add_argument("--out", default="results/pretrain/shapes_classifier", help="asset folder to write")
    parser.add_argument("--steps", type=int, default=ClassifierTrainConfig().steps)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    directory = Path(args.measure) if args.measure else train_classifier(
        ClassifierTrainConfig(steps=args.steps, seed=args.seed), Path(args.out)
    )  # fmt: skip
    report = measure_report(directory)
    (directory / "agreement.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
