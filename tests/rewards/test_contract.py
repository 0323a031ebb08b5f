"""The reward contract's input side, for every registered reward: a batch no reward can score is refused.

Non-finite pixels, pixels outside [0, 1] and non-(B, 3, H, W) batches raise :class:`RewardError` (a NaN image
scored 0.0 would be a silent reward). The check (:func:`harness.types.check_images`) runs before any model
loads, so the learned scorers are built with paths that do not exist: reaching their loader would be a
different error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from benchmarks.shapes.prompts import sample_prompts
from harness.types import IMAGE_TOLERANCE, Prompt, Reward, RewardError, check_images
from rewards import REWARDS
from rewards.server import make_server
from rewards.shapes import ShapesGenEval
from tests.rewards.geneval_fakes import PaletteColors, ScriptedDetector

NAMES = [f"n{i}" for i in range(80)]
OCR_PROMPTS = [Prompt('a sign that says "open"'), Prompt('a shirt that says "hello"')]


class NoEngine:
    """An OCR engine that must never be reached."""

    name, version = "none", "0"

    def read(self, images):
        raise AssertionError("the OCR engine read an image the reward should have refused")


@pytest.fixture(scope="module")
def remote_url() -> Iterator[str]:
    server = make_server(ShapesGenEval(), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server.url
    server.shutdown()
    server.server_close()


def options(url: str) -> dict[str, dict]:
    """Constructor options of every registered reward that reach no file, model or engine before scoring."""
    return {
        "shapes_geneval": {},
        "shapes_classifier": {},
        "random_control": {},
        "ocr": {"engine": NoEngine()},
        "remote": {"url": url, "timeout": 10, "retries": 0},
        "pickscore": {"model": "/nonexistent/pickscore", "processor": "/nonexistent/pickscore"},
        "hpsv2": {"checkpoint": "/nonexistent/HPS_v2.1_compressed.pt"},
        "clipscore": {"model": "/nonexistent/clip"},
        "aesthetic": {"model": "/nonexistent/clip"},
        "imagereward": {"checkpoint": "/nonexistent/ImageReward.pt", "med_config": "/nonexistent/med_config.json"},
        "geneval": {"backend": ScriptedDetector([]), "color_classifier": PaletteColors(), "class_names": NAMES},
    }


@pytest.fixture(params=sorted(REWARDS.keys()))
def make(request: pytest.FixtureRequest, remote_url: str) -> Callable[[], Reward]:
    key = request.param
    table = options(remote_url)
    assert key in table, f"add the new reward {key!r} to options() in {__file__}"
    return lambda: REWARDS.get(key)(**table[key])


def shapes_batch(n: int = 3) -> tuple[torch.Tensor, list[Prompt]]:
    prompts = [Prompt(md["prompt"], md) for md in sample_prompts(np.random.default_rng(0), n)]
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)), prompts


def prompts_for(reward: Reward, n: int) -> list[Prompt]:
    return (OCR_PROMPTS * n)[:n] if reward.spec.name == "ocr" else shapes_batch(n)[1]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (float("nan"), "non-finite"),
        (float("inf"), "non-finite"),
        (-float("inf"), "non-finite"),
        (1.0 + 10 * IMAGE_TOLERANCE, r"expects pixels in \[0, 1\]"),
        (-0.5, r"expects pixels in \[0, 1\]"),
    ],
)
def test_every_reward_refuses_bad_pixels(make, bad, message):
    reward = make()
    images = shapes_batch(3)[0]
    images[2, 1, 7, 3] = bad
    with pytest.raises(RewardError, match=rf"{message}.*batch positions \[2\]"):
        reward(images, prompts_for(reward, 3))


def test_every_reward_refuses_a_batch_of_the_wrong_shape_or_dtype(make):
    reward = make()
    with pytest.raises(RewardError, match=r"shape \(B, 3, H, W\)"):
        reward(torch.rand(2, 1, 32, 32), prompts_for(reward, 2))
    with pytest.raises(RewardError, match="float images"):
        reward(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), prompts_for(reward, 2))


def test_check_images_accepts_the_contract_and_a_rounding_tolerance():
    images = torch.rand(4, 3, 8, 8)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = -IMAGE_TOLERANCE / 2, 1 + IMAGE_TOLERANCE / 2
    check_images("r", images)
    check_images("r", torch.rand(0, 3, 8, 8))  # an empty batch has nothing to refuse
    check_images("r", images.double().requires_grad_(True))  # any float dtype; gradients untouched
    images[3] = float("nan")
    with pytest.raises(RewardError, match=r"reward 'r' got non-finite pixels .* batch positions \[3\]"):
        check_images("r", images)
