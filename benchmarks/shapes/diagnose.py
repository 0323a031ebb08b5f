"""Diagnostics of a shapes base model (issue 15): can it denoise, does the prompt steer it, what does the detector count.

``python -m benchmarks.shapes.diagnose [CHECKPOINT]`` prints, on the eval prompts (one image each):

* restart: each prompt's ground-truth render noised to ``t0`` and sampled back with its prompt
  (Euler, ``round(10·t0)`` steps); GenEval ``overall`` and ``extra_objects``. A model that cannot
  restore a half-noised ground truth fails at pixel-level denoising, whatever its layout or sampler;
* loss: the flow-matching loss at ``t`` with the prompt and with the empty prompt (equal: the prompt
  does not steer the model, so CFG has nothing to amplify);
* sides: the bounding-box side of every component the detector finds on the model's own samples
  (CFG 1, ≥ ``MIN_AREA`` pixels), and of those it keeps at GenEval's 0.3.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np
import torch

from benchmarks.shapes.benchmark import ShapesBenchmark
from benchmarks.shapes.checkpoint import load_shapes_policy
from benchmarks.shapes.pretrain import render_batch
from harness.images import to_uint8
from harness.policies.tiny_dit import TinyDiTPolicy
from harness.shapes_world.detect import detect


def euler(policy: TinyDiTPolicy, x: torch.Tensor, texts: list[str], t0: float, steps: int) -> torch.Tensor:
    cond = policy.encode(texts)
    times = torch.linspace(t0, 0.0, steps + 1)
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        x = x + (t_next - t) * policy.velocity(x, torch.full((x.shape[0],), float(t)), cond)
    return policy.decode(x)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=None, help="checkpoint folder (default: the committed base)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    policy = load_shapes_policy(Path(args.checkpoint) if args.checkpoint else None)
    benchmark = ShapesBenchmark(images_per_prompt=1)
    prompts = benchmark.eval_prompts()
    texts = [p.text for p in prompts]
    x0 = render_batch([dict(p.metadata) for p in prompts], np.random.default_rng(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    for t0 in (0.3, 0.5, 0.7, 0.9, 1.0):
        images = euler(policy, (1 - t0) * x0 + t0 * noise, texts, t0, max(1, round(10 * t0)))
        scores = benchmark.evaluate(images, prompts)
        t = torch.full((len(prompts),), t0 if t0 < 1 else 0.99)
        x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        losses = [(policy.velocity(x_t, t, policy.encode(ps)) - (noise - x0)).pow(2).mean().item()
                  for ps in (texts, [""] * len(texts))]  # fmt: skip
        print(f"t0 {t0:.1f}: restart overall {scores['overall']:.3f} strict {scores['strict_overall']:.3f} "
              f"extra {scores['extra_objects']:.2f} | loss prompt {losses[0]:.4f} empty {losses[1]:.4f}")  # fmt: skip
    found: collections.Counter[int] = collections.Counter()
    kept: collections.Counter[int] = collections.Counter()
    for image in to_uint8(euler(policy, noise, texts, 1.0, 10)):
        for dets in detect(image).values():
            for d in dets:
                side = int(max(d.box[2] - d.box[0], d.box[3] - d.box[1]))
                found[side] += 1
                kept[side] += d.score > 0.3
    print("CFG 1 samples, components by side:", dict(sorted(found.items())))
    print("               kept (score > 0.3):", dict(sorted(kept.items())))


if __name__ == "__main__":
    main()
