"""Scorer throughput: images/s of each registered learned reward (tiny random checkpoints) and RapidOCR, on the CPU.

Every learned reward is built through the registry with its default batch size and its real loading path,
pointed at the tiny checkpoints of ``tests/rewards/tiny_scorers.py`` (no real weights exist offline), so
the numbers measure the harness-side cost (preprocessing of full-size images, tokenisation, batching)
plus a tiny model, not the real ViT-L/H models. OCR is the real RapidOCR engine with its shipped weights.

    python -m benchmarks.reward_speed --out results/bench/reward_speed.md [--size 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from benchmarks.base import Prompt
from rewards import REWARDS

logger = logging.getLogger(__name__)

LEARNED = ("pickscore", "hpsv2", "clipscore", "aesthetic", "imagereward")


def text_images(n: int, size: int) -> tuple[torch.Tensor, list[Prompt]]:
    """``n`` white images with a black word drawn on them, and prompts quoting the word."""
    words = ["OPEN", "HELLO", "SALE", "NASA"]
    images, prompts = [], []
    font = ImageFont.load_default(size=size // 8)
    for i in range(n):
        word = words[i % len(words)]
        image = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(image).text((size // 8, size // 3), word, fill="black", font=font)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
        prompts.append(Prompt(f'a sign that says "{word}"'))
    return torch.stack(images), prompts


def time_reward(reward, images: torch.Tensor, prompts: list[Prompt], repeats: int) -> float:
    """Best-of-``repeats`` images/s, after one warm-up call (which also loads the weights)."""
    reward(images[:1], prompts[:1])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        reward(images, prompts)
        best = min(best, time.perf_counter() - start)
    return images.shape[0] / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench/reward_speed.md"))
    parser.add_argument("--size", type=int, default=512, help="input image side (SD3.5 renders 512 or 1024)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=2, help="default-size batches per timed call")
    parser.add_argument("--ocr-images", type=int, default=4)
    parser.add_argument("--no-ocr", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tests.rewards.tiny_scorers import save_all

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        options = save_all(Path(tmp))
        for key in LEARNED:
            reward = REWARDS.get(key)(**options[key])
            n = reward.batch_size * args.batches
            images, prompts = text_images(n, args.size)
            rate = time_reward(reward, images, prompts, args.repeats)
            rows.append((key, "tiny random", reward.batch_size, n, rate))
            logger.info("%s: %.1f images/s", key, rate)
    if not args.no_ocr:
        reward = REWARDS.get("ocr")()
        images, prompts = text_images(args.ocr_images, args.size)
        rate = time_reward(reward, images, prompts, args.repeats)
        rows.append(("ocr", reward.spec.version, reward.engine.batch_size, args.ocr_images, rate))
        logger.info("ocr: %.2f images/s", rate)

    device = f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    lines = [
        "# Reward scorer throughput",
        "",
        f"Device: {device}. Images {args.size}x{args.size}, best of {args.repeats} timed calls after a warm-up.",
        "Learned scorers use tiny random checkpoints (tests/rewards/tiny_scorers.py): this measures the harness",
        "path (preprocessing, tokenisation, batching) plus a tiny model, not the real ViT-L/H cost.",
        "",
        "| reward | weights | batch size | images per call | images/s |",
        "|---|---|---:|---:|---:|",
        *(f"| {k} | {w} | {b} | {n} | {r:.1f} |" for k, w, b, n, r in rows),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
