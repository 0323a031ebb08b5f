"""The ``geneval`` reward through its real path (detections → filter → colours → rules) with a scripted
detector and a palette colour classifier: each task passing and failing for each reason, the three
judgements, batching, errors, every official metadata entry; and once end to end with tiny random
Mask2Former and CLIP models loaded from disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harness.geneval_rules import GENEVAL_COLORS, GenEvalRules, MetadataError
from harness.images import to_uint8
from harness.types import Prompt, Reward, RewardError
from rewards import REWARDS
from rewards.geneval_reward import GenEvalReward
from tests.rewards.geneval_fakes import PaletteColors, ScriptedDetector, paint, save_tiny_mask2former
from tests.rewards.tiny_scorers import save_tiny_clip


@pytest.fixture
def class_names(shared_data):
    return (shared_data / "geneval" / "object_names.txt").read_text().splitlines()


def reward_for(class_names, outputs, judgement="correct", **kwargs):
    return GenEvalReward(
        judgement=judgement,
        backend=ScriptedDetector(outputs),
        class_names=class_names,
        color_classifier=PaletteColors(),
        **kwargs,
    )


def inc(cls, count=1, **extra):
    return {"class": cls, "count": count, **extra}


SINGLE = {"tag": "single_object", "include": [inc("dog")], "prompt": "a photo of a dog"}
TWO = {"tag": "two_object", "include": [inc("dog"), inc("cat")], "prompt": "a photo of a dog and a cat"}
COUNTING = {"tag": "counting", "include": [inc("cat", 3)], "exclude": [inc("cat", 4)], "prompt": "three cats"}
COLORS = {"tag": "colors", "include": [inc("car", color="red")], "prompt": "a photo of a red car"}
POSITION = {
    "tag": "position",
    "include": [inc("bench"), inc("dog", position=["left of", 0])],
    "prompt": "a photo of a dog left of a bench",
}
COLOR_ATTR = {
    "tag": "color_attr",
    "include": [inc("car", color="red"), inc("bench", color="blue")],
    "prompt": "a photo of a red car and a blue bench",
}


def obj(cls, x, y=4, color=None, score=0.95, w=10):
    return (cls, (x, y, x + w, y + 10), color, score)


CASES = [
    ("single/pass", SINGLE, [obj("dog", 0)], True, ""),
    ("single/missing", SINGLE, [obj("cat", 0)], False, "expected dog>=1, found 0"),
    ("single/below-0.3", SINGLE, [obj("dog", 0, score=0.3)], False, "expected dog>=1, found 0"),
    ("two/pass", TWO, [obj("dog", 0), obj("cat", 20)], True, ""),
    ("two/second-missing", TWO, [obj("dog", 0)], False, "expected cat>=1, found 0"),
    ("two/first-missing", TWO, [obj("cat", 20, score=0.31), obj("dog", 0, score=0.2)], False, "expected dog>=1"),
    ("counting/pass", COUNTING, [obj("cat", 0), obj("cat", 15), obj("cat", 30)], True, ""),
    (
        "counting/below-0.9",
        COUNTING,
        [obj("cat", 0), obj("cat", 15), obj("cat", 30, score=0.9)],
        False,
        "cat>=3, found 2",
    ),
    ("counting/too-many", COUNTING, [obj("cat", x) for x in (0, 15, 30, 45)], False, "expected cat<4, found 4"),
    ("colors/pass", COLORS, [obj("car", 0, color="red")], True, ""),
    ("colors/wrong-colour", COLORS, [obj("car", 0, color="blue")], False, "expected red car>=1, found 0 (blue)"),
    (
        "colors/top-1-decides",
        COLORS,
        [obj("car", 0, color="blue"), obj("car", 20, color="red", score=0.5)],
        False,
        "found 0",
    ),
    ("colors/missing", COLORS, [obj("bench", 0, color="red")], False, "expected car>=1, found 0"),
    ("position/pass", POSITION, [obj("dog", 0), obj("bench", 40)], True, ""),
    (
        "position/wrong-side",
        POSITION,
        [obj("dog", 40), obj("bench", 0)],
        False,
        "expected dog left of target, found right of",
    ),
    ("position/too-close", POSITION, [obj("dog", 0), obj("bench", 1)], False, "found no clear relation target"),
    ("position/no-target", POSITION, [obj("dog", 0)], False, "no target for dog to be left of"),
    ("position/missing-object", POSITION, [obj("bench", 40)], False, "expected dog>=1, found 0"),
    ("color_attr/pass", COLOR_ATTR, [obj("car", 0, color="red"), obj("bench", 30, color="blue")], True, ""),
    (
        "color_attr/first-colour",
        COLOR_ATTR,
        [obj("car", 0, color="pink"), obj("bench", 30, color="blue")],
        False,
        "expected red car",
    ),
    (
        "color_attr/second-colour",
        COLOR_ATTR,
        [obj("car", 0, color="red"), obj("bench", 30, color="brown")],
        False,
        "expected blue bench",
    ),
    ("color_attr/missing", COLOR_ATTR, [obj("car", 0, color="red")], False, "expected bench>=1, found 0"),
]


@pytest.mark.parametrize(
    ("metadata", "objects", "correct", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_each_task_passes_and_fails_for_each_reason(class_names, metadata, objects, correct, reason):
    image, found = paint(objects)
    reward = reward_for(class_names, [found])
    (judged,) = reward.judge([image], [metadata])
    assert judged.result.correct is correct, judged.result.reason
    assert reason in judged.result.reason if reason else judged.result.reason == ""
    assert judged.backend == "fake:0" and judged.color_model == "palette"


def test_the_three_judgements_come_from_the_same_detections(class_names):
    image, found = paint([obj("dog", 0), obj("dog", 20), obj("dog", 40)])
    values = {}
    for judgement in ("correct", "strict", "score"):
        reward = reward_for(class_names, [found], judgement=judgement)
        values[judgement] = reward(torch.from_numpy(image).permute(2, 0, 1)[None] / 255, [Prompt("a dog", SINGLE)])
    # Official: >= 1 dog; FlowGRPO strict: exactly 1; partial: 1 - |1 - 3| / 1 = -1.
    assert {k: v.tolist() for k, v in values.items()} == {"correct": [1.0], "strict": [0.0], "score": [-1.0]}


def test_score_variants_reach_the_engine(class_names):
    wrong_side = paint([obj("dog", 40), obj("bench", 0)])
    scores = {}
    for variant in ("flowgrpo", "corrected"):
        reward = reward_for(class_names, [wrong_side[1]], judgement="score", score_variant=variant)
        scores[variant] = reward.judge([wrong_side[0]], [POSITION])[0].result.score
    assert scores == {"flowgrpo": pytest.approx(0.75), "corrected": pytest.approx(2 / 3)}


def test_colours_are_named_for_every_kept_detection_of_colour_classes_only(class_names):
    # Two red cars kept, one below 0.3 dropped; FlowGRPO's partial score counts colours over all kept.
    image, found = paint(
        [
            obj("car", 0, color="red"),
            obj("car", 20, color="red", score=0.6),
            obj("car", 40, color="red", score=0.1),
            obj("dog", 0, 30),
        ]
    )
    reward = reward_for(class_names, [found], judgement="score")
    (judged,) = reward.judge([image], [COLORS])
    assert reward.colors.calls == [("car", 2)]
    assert judged.colors() == {"car": ["red", "red"], "dog": [None]}
    assert judged.result.correct and not judged.result.strict
    assert judged.result.score == pytest.approx(0.0)  # [1 - |1 - 2|, 0 for the colour clause with a wrong count]
    assert judged.details()["car"][0] == [0, 4, 10, 14, pytest.approx(0.95)]
    quiet = reward_for(class_names, [found])
    quiet.judge([image], [SINGLE])
    assert quiet.colors.calls == []


def test_batches_min_score_and_the_tensor_interface(class_names):
    outputs = [paint([obj("dog", 0)])[1] for _ in range(5)]
    reward = reward_for(class_names, outputs, batch_size=2)
    images = torch.rand(5, 3, 32, 32)
    scores = reward(images, [Prompt("a dog", SINGLE)] * 5)
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0] * 5
    assert reward.detector.calls == [(2, 0.3), (2, 0.3), (1, 0.3)]
    assert [j.backend for j in reward.last_results] == ["fake:0"] * 5
    assert isinstance(reward, Reward) and reward.spec.name == "geneval"
    assert reward.spec.version == "1/correct/flowgrpo/fake"


def test_spec_range_covers_the_negative_partial_score(class_names):
    assert reward_for(class_names, [], judgement="score").spec.value_range == (-14.0, 1.0)
    assert reward_for(class_names, [], judgement="strict").spec.value_range == (0.0, 1.0)


def test_detector_failures_are_reward_errors(class_names):
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    with pytest.raises(RewardError, match="returned 0 results for 1 images"):
        reward_for(class_names, []).judge([image], [SINGLE])
    with pytest.raises(RewardError, match="unknown classes \\['unicorn'\\]"):
        reward_for(class_names, [paint([obj("unicorn", 0)])[1]]).judge([image], [SINGLE])


def test_bad_metadata_and_options_are_rejected_before_detection(class_names):
    reward = reward_for(class_names, [{}])
    unicorn = {"tag": "single_object", "include": [inc("unicorn")], "prompt": "a unicorn"}
    with pytest.raises(MetadataError, match="image 0 \\(prompt 'a unicorn'\\).*'unicorn' is not a known class"):
        reward.judge([np.zeros((8, 8, 3), np.uint8)], [unicorn])
    with pytest.raises(MetadataError, match="metadata\\['tag'\\] = None"):
        reward(torch.zeros(1, 3, 8, 8), [Prompt("no metadata")])
    assert reward.detector.calls == []
    with pytest.raises(ValueError, match="judgement must be"):
        reward_for(class_names, [], judgement="accuracy")
    with pytest.raises(ValueError, match="score_variant must be"):
        reward_for(class_names, [], score_variant="fixed")
    with pytest.raises(ValueError, match="configure a named backend only"):
        reward_for(class_names, [], rgb_as_bgr=True)
    with pytest.raises(MetadataError, match="80 distinct class names"):
        reward_for(class_names[:79], [])


def test_named_backends_get_the_options(class_names, tmp_path):
    reward = GenEvalReward(backend="hf", detector_path=tmp_path, rgb_as_bgr=True, batch_size=3, class_names=class_names)
    assert (
        reward.detector.rgb_as_bgr and reward.detector.batch_size == 3 and reward.detector.model_path == str(tmp_path)
    )
    assert reward.spec.version == "1/score/flowgrpo/hf/rgb_as_bgr"
    assert (
        reward.backend.startswith("hf:transformers-") and reward.colors.name == "hf-clip:openai/clip-vit-large-patch14"
    )
    assert not GenEvalReward(backend="hf", class_names=class_names).detector.rgb_as_bgr  # correct order by default
    assert REWARDS.get("geneval") is GenEvalReward


def layout(metadata):
    """Objects that satisfy the metadata: each clause on its own row; a position clause around a centred target."""
    objects = []
    if metadata["tag"] == "position":
        target, placed = metadata["include"]
        relation = placed["position"][0]
        objects.append((target["class"], (24, 24, 40, 40), None, 0.95))
        x, y = {"left of": (0, 24), "right of": (48, 24), "above": (24, 0), "below": (24, 48)}[relation]
        objects.append((placed["class"], (x, y, x + 16, y + 16), None, 0.95))
        return objects
    for row, clause in enumerate(metadata["include"]):
        for k in range(clause["count"]):
            objects.append(
                (clause["class"], (2 + 15 * k, 4 + 30 * row, 12 + 15 * k, 24 + 30 * row), clause.get("color"), 0.95)
            )
    return objects


def test_every_official_metadata_entry_is_judged_by_the_reward(shared_data, class_names):
    lines = (shared_data / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines()
    metadatas = [json.loads(line) for line in lines]
    painted = [paint(layout(md)) for md in metadatas]
    reward = reward_for(class_names, [found for _, found in painted], batch_size=64)
    judged = reward.judge([image for image, _ in painted], metadatas)
    failed = [(md["prompt"], j.result.reason) for md, j in zip(metadatas, judged, strict=True) if not j.result.correct]
    assert len(judged) == 553 and failed == []
    assert all(j.result.strict and j.result.score == 1.0 for j in judged)
    assert {j.result.tag for j in judged} == {
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "color_attr",
    }
    # The same prompts with nothing detected all fail, and the partial score drops to 0 or below.
    empty = reward_for(class_names, [{} for _ in metadatas], judgement="score")
    scores = empty(torch.zeros(len(metadatas), 3, 8, 8), [Prompt(md["prompt"], md) for md in metadatas])
    assert scores.shape == (553,) and bool((scores <= 0).all())
    assert not any(j.result.correct for j in empty.last_results)


def test_hf_backend_and_tiny_clip_end_to_end_through_the_reward(tmp_path, class_names):
    m2f = save_tiny_mask2former(tmp_path / "m2f", class_names)
    clip = save_tiny_clip(tmp_path / "clip")
    rules = GenEvalRules(threshold=0.0, counting_threshold=0.0)  # random weights score low: keep everything
    reward = GenEvalReward(
        judgement="score", backend="hf", detector_path=m2f, clip_path=clip, class_names=class_names, rules=rules
    )
    reward.detector.size = {"shortest_edge": 64, "longest_edge": 96}  # for speed; mmdet's 800/1333 is tested elsewhere
    images = torch.rand(2, 3, 48, 64)
    found = reward.detector.detect(list(to_uint8(images)), 0.0)
    cls = max(found[0], key=lambda c: len(found[0][c]))  # a class the random model does find, to get colours
    metadata = {"tag": "colors", "include": [inc(cls, color="red")], "prompt": f"a photo of a red {cls}"}
    scores = reward(images, [Prompt(metadata["prompt"], metadata)] * 2)
    assert scores.shape == (2,) and bool(torch.isfinite(scores).all())
    first = reward.last_results[0]
    assert first.backend.startswith("hf:transformers-") and first.backend.endswith(str(m2f))
    assert first.color_model == f"hf-clip:{clip}"
    named = first.colors()[cls]
    assert len(named) == min(len(found[0][cls]), 16) and set(named) <= set(GENEVAL_COLORS)
    assert [d[4] for d in first.details()[cls]] == sorted((i.score for i in found[0][cls]), reverse=True)[:16]
