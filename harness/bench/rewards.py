"""Scorer throughput: images/s of each registered learned reward (tiny random checkpoints) and RapidOCR, on the CPU.

Every learned reward is built through the registry with its default batch size and its real loading path,
pointed at the tiny checkpoints of ``tests/rewards/tiny_scorers.py`` (no real weights exist offline), so
the numbers measure the harness-side cost (preprocessing of full-size images, tokenisation, batching)
plus a tiny model, not the real ViT-L/H models. OCR is the real RapidOCR engine with its shipped weights.

    diffrl bench rewards [--out results/bench] [--size 512] [--repeats 3]
"""

from __future__ import annotations

import importlib.util
import logging
import platform
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from harness.types import Prompt
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


def _tiny_scorers() -> ModuleType:
    """``tests/rewards/tiny_scorers.py`` of this checkout, loaded by path (the test tree is not an installed package)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "rewards" / "tiny_scorers.py"
    spec = importlib.util.spec_from_file_location("tiny_scorers", path) if path.is_file() else None
    if spec is None or spec.loader is None:
        raise FileNotFoundError(
            f"{path} not found: diffrl bench rewards runs from a source checkout (pip install -e .)"
        )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_rewards(
    out: Path, size: int = 512, repeats: int = 3, batches: int = 2, ocr_images: int = 4, ocr: bool = True
) -> Path:
    """Time every learned reward on ``batches`` default-size batches (and OCR on ``ocr_images``); write
    ``out/reward_speed.md`` and return its path."""
    save_all = _tiny_scorers().save_all
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        options = save_all(Path(tmp))
        for key in LEARNED:
            reward = REWARDS.get(key)(**options[key])
            n = reward.batch_size * batches
            images, prompts = text_images(n, size)
            rate = time_reward(reward, images, prompts, repeats)
            rows.append((key, "tiny random", reward.batch_size, n, rate))
            logger.info("%s: %.1f images/s", key, rate)
    if ocr:
        reward = REWARDS.get("ocr")()
        images, prompts = text_images(ocr_images, size)
        rate = time_reward(reward, images, prompts, repeats)
        rows.append(("ocr", reward.spec.version, reward.engine.batch_size, ocr_images, rate))
        logger.info("ocr: %.2f images/s", rate)
    device = f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    lines = [
        "# Reward scorer throughput",
        "",
        f"Device: {device}. Images {size}x{size}, best of {repeats} timed calls after a warm-up.",
        "Learned scorers use tiny random checkpoints (tests/rewards/tiny_scorers.py): this measures the harness",
        "path (preprocessing, tokenisation, batching) plus a tiny model, not the real ViT-L/H cost.",
        "",
        "| reward | weights | batch size | images per call | images/s |",
        "|---|---|---:|---:|---:|",
        *(f"| {k} | {w} | {b} | {n} | {r:.1f} |" for k, w, b, n, r in rows),
        "",
        f"Made by `diffrl bench rewards --size {size} --repeats {repeats} --batches {batches} --ocr-images "
        f"{ocr_images}{'' if ocr else ' --no-ocr'} --out {out}`.",
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "reward_speed.md"
    path.write_text("\n".join(lines))
    logger.info("wrote %s", path)
    return path
