"""The shapes world's grammar, renderer and detector."""

import numpy as np
import pytest
import torch

from benchmarks.shapes.benchmark import ShapesBenchmark
from harness.geneval_rules import TASKS, GenEvalRules, MetadataError, evaluate_detections, surplus_detections
from harness.shapes_world.detect import detect
from harness.shapes_world.render import add_distractors, draw, layout, render
from harness.shapes_world.world import COLORS, SHAPES, all_prompts, make_metadata, parse_prompt, prompt_text


@pytest.mark.parametrize("tag", TASKS)
def test_grammar_round_trips(tag):
    for metadata in all_prompts(tag):
        assert parse_prompt(metadata["prompt"]) == metadata
        assert prompt_text(metadata) == metadata["prompt"]


def test_prompts_follow_geneval_templates():
    assert make_metadata("counting", ("triangle",), count=3)["prompt"] == "a photo of three triangles"
    position = make_metadata("position", ("circle", "square"), relation="left of")
    assert position["prompt"] == "a photo of a circle left of a square"
    assert position["include"] == [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["left of", 0]},
    ]
    assert make_metadata("colors", ("circle",), colors=("orange",))["prompt"] == "a photo of an orange circle"
    assert make_metadata("counting", ("circle",), count=2)["exclude"] == [{"class": "circle", "count": 3}]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_metadata("sizes", ("circle",)), "unknown task 'sizes'; allowed: single_object"),
        (lambda: make_metadata("colors", ("circle",), colors=("teal",)), "'teal'; allowed: red"),
        (lambda: make_metadata("single_object", ("hexagon",)), "'hexagon' is not a known class; allowed: circle"),
        (lambda: make_metadata("counting", ("circle",), count=7), "allowed: \\[2, 3, 4\\]"),
        (lambda: make_metadata("two_object", ("circle", "circle")), "two different shapes"),
        (lambda: parse_prompt("a photo of a teal circle"), "outside the shapes vocabulary: \\['teal'\\]"),
        (lambda: parse_prompt("a photo of a red blue"), "'blue' in prompt .* is not a shape"),
        (lambda: parse_prompt("a photo of a circle of a square"), "matches none of the grammar's templates"),
        (lambda: render({"tag": "counting", "include": "circle"}, np.random.default_rng(0)), "metadata\\['include'\\]"),
    ],
)
def test_bad_input_names_the_field(call, message):
    with pytest.raises(MetadataError, match=message):
        call()


def test_detector_recovers_every_rendered_object():
    rng = np.random.default_rng(0)
    for tag in TASKS:
        for metadata in all_prompts(tag)[:24]:
            objects = layout(metadata, rng)
            detections = detect(draw(objects))
            found = sorted((d.box, cls, d.color, d.score) for cls, dets in detections.items() for d in dets)
            expected = sorted((tuple(float(v) for v in o.box), o.shape, o.color, 1.0) for o in objects)
            assert found == expected, metadata["prompt"]


def test_judge_passes_ground_truth_renders():
    rng = np.random.default_rng(1)
    results = []
    for tag in TASKS:
        pool = all_prompts(tag)
        for i in range(60):
            metadata = pool[i % len(pool)]
            results.append(evaluate_detections(metadata, detect(render(metadata, rng))))
    assert np.mean([r.correct for r in results]) >= 0.99
    assert np.mean([r.strict for r in results]) >= 0.99
    assert np.mean([r.score for r in results]) >= 0.99


def test_detector_scores_malformed_shapes_lower():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[4:12, 4:12] = COLORS["red"]
    image[4:6, 4:6] = 0  # a notched square
    ((cls, dets),) = detect(image).items()
    assert cls in SHAPES and 0.3 < dets[0].score < 0.99 and dets[0].color == "red"
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert all(d.score < 0.9 for dets in detect(noise).values() for d in dets)


def test_detector_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        detect(np.zeros((32, 32, 3), dtype=np.float32))


def test_fragments_smaller_than_any_object_are_not_kept():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[2:6, 2:6] = COLORS["red"]  # a 4x4 block: a sampler's stray patch, a "perfect square"
    image[20:27, 20:27] = COLORS["blue"]  # the smallest square the renderer draws
    detections = detect(image)["square"]
    scores = {d.color: d.score for d in detections}
    assert scores["blue"] == 1.0 and scores["red"] < GenEvalRules().threshold


def test_extra_objects_count_surplus_detections():
    rng = np.random.default_rng(2)
    benchmark = ShapesBenchmark(prompts_per_task=2, images_per_prompt=1)
    prompts = benchmark.eval_prompts()
    clean = [draw(layout(p.metadata, rng)) for p in prompts]
    cluttered = [draw(add_distractors(layout(p.metadata, rng), 2, rng)) for p in prompts]

    def as_tensor(images):
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255

    scores = benchmark.evaluate(as_tensor(clean), prompts)
    assert scores["extra_objects"] == 0.0
    assert all(scores[tag] == 1.0 for tag in TASKS) and scores["strict_overall"] == 1.0
    assert benchmark.evaluate(as_tensor(cluttered), prompts)["extra_objects"] > 0


def test_distractors_are_clear_of_the_scene():
    rng = np.random.default_rng(3)
    metadata = all_prompts("two_object")[0]
    objects = add_distractors(layout(metadata, rng), 3, rng)
    assert len(objects) == 5
    detections = detect(draw(objects))
    assert sum(len(d) for d in detections.values()) == 5
    assert surplus_detections(metadata, detections) == 3
