"""The GenEval rules on hand-made detections, one test per clause kind."""

import json

import pytest

from harness.geneval_rules import (
    Detection,
    GenEvalRules,
    MetadataError,
    evaluate_detections,
    filter_detections,
    relative_position,
    task_summary,
    validate_metadata,
)


def det(x1, y1, size=10, score=0.95, color=None):
    return Detection((x1, y1, x1 + size, y1 + size), score, color)


def include(cls, count=1, **extra):
    return {"class": cls, "count": count, **extra}


def test_single_object_needs_one_detection_above_threshold():
    md = {"tag": "single_object", "include": [include("dog")]}
    assert evaluate_detections(md, {"dog": [det(0, 0, score=0.31)]}).correct
    result = evaluate_detections(md, {"dog": [det(0, 0, score=0.3)]})  # strictly greater than 0.3
    assert not result.correct and "expected dog>=1, found 0" in result.reason
    # An extra instance passes the official rule but not FlowGRPO's strict one.
    two = evaluate_detections(md, {"dog": [det(0, 0), det(20, 0)]})
    assert two.correct and not two.strict


def test_counting_uses_the_09_threshold_and_the_exclude_clause():
    md = {"tag": "counting", "include": [include("cat", 3)], "exclude": [include("cat", 4)]}
    three = [det(0, 0), det(20, 0), det(40, 0)]
    assert evaluate_detections(md, {"cat": three}).correct
    weak = three[:2] + [det(40, 0, score=0.85)]  # passes 0.3, fails 0.9
    assert not evaluate_detections(md, {"cat": weak}).correct
    four = three + [det(60, 0)]
    result = evaluate_detections(md, {"cat": four})
    assert not result.correct and "expected cat<4, found 4" in result.reason
    # The same image is fine for a non-counting tag: the 0.9 threshold applies to counting only.
    assert evaluate_detections({"tag": "two_object", "include": [include("cat", 3)]}, {"cat": weak}).correct


def test_colour_is_judged_on_the_top_count_objects():
    md = {"tag": "colors", "include": [include("car", color="red")]}
    assert evaluate_detections(md, {"car": [det(0, 0, color="red")]}).correct
    assert not evaluate_detections(md, {"car": [det(0, 0, color="blue")]}).correct
    # A lower-scored red car does not rescue a blue top-1 car.
    ranked = [det(0, 0, score=0.9, color="blue"), det(20, 0, score=0.5, color="red")]
    assert not evaluate_detections(md, {"car": ranked}).correct


@pytest.mark.parametrize(
    ("relation", "a_xy"),
    [("left of", (0, 20)), ("right of", (40, 20)), ("above", (20, 0)), ("below", (20, 40))],
)
def test_each_position_relation(relation, a_xy):
    md = {"tag": "position", "include": [include("b"), include("a", position=[relation, 0])]}
    detections = {"b": [det(20, 20)], "a": [det(*a_xy)]}
    assert evaluate_detections(md, detections).correct
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
    md_wrong = {"tag": "position", "include": [include("b"), include("a", position=[opposite, 0])]}
    result = evaluate_detections(md_wrong, detections)
    assert not result.correct and f"expected a {opposite} target" in result.reason


def test_position_fails_without_target_and_within_threshold():
    md = {"tag": "position", "include": [include("b"), include("a", position=["left of", 0])]}
    result = evaluate_detections(md, {"a": [det(0, 0)]})
    assert not result.correct and "expected b>=1, found 0" in result.reason and "no target" in result.reason
    # Centres 1 px apart: the 0.1 × (summed extents) margin swallows the offset.
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()


def test_relative_position_matches_geneval_geometry():
    assert relative_position((0, 0, 10, 10), (30, 0, 40, 10)) == {"left of"}
    assert relative_position((30, 30, 40, 40), (0, 0, 10, 10)) == {"right of", "below"}  # diagonal: both
    assert relative_position((0, 0, 10, 10), (3, 30, 13, 40)) == {"above"}


def test_filter_sorts_caps_and_thresholds():
    many = [det(i, 0, score=0.4 + i / 100) for i in range(20)]
    kept = filter_detections({"x": many}, "single_object")["x"]
    assert len(kept) == 16 and kept[0].score == pytest.approx(0.59)
    assert filter_detections({"x": [det(0, 0, score=0.2)]}, "single_object") == {}
    overlapping = [det(0, 0, score=0.9), det(1, 0, score=0.8)]
    assert len(filter_detections({"x": overlapping}, "single_object", GenEvalRules(max_overlap=0.5))["x"]) == 1


def test_partial_score_variants():
    md = {"tag": "position", "include": [include("b"), include("a", position=["left of", 0])]}
    wrong_side = {"b": [det(0, 20)], "a": [det(40, 20)]}
    # FlowGRPO: [1 (b count), 1 (a count), 0 (violation), 1.0 (their unconditional append)] → 0.75
    assert evaluate_detections(md, wrong_side).score == pytest.approx(0.75)
    assert evaluate_detections(md, wrong_side, score_variant="corrected").score == pytest.approx(2 / 3)
    right_side = {"b": [det(40, 20)], "a": [det(0, 20)]}
    assert evaluate_detections(md, right_side).score == 1.0
    # Count term can be negative: three found, one asked.
    single = {"tag": "single_object", "include": [include("dog")]}
    assert evaluate_detections(single, {"dog": [det(0, 0), det(20, 0), det(40, 0)]}).score == pytest.approx(-1.0)
    colour = {"tag": "color_attr", "include": [include("a", color="red"), include("b", color="blue")]}
    result = evaluate_detections(colour, {"a": [det(0, 0, color="red")], "b": [det(20, 0, color="green")]})
    assert result.score == pytest.approx(3 / 4) and not result.strict and not result.correct
    counting = {"tag": "counting", "include": [include("c", 2)], "exclude": [include("c", 3)]}
    three = {"c": [det(0, 0), det(20, 0), det(40, 0)]}
    assert evaluate_detections(counting, three).score == pytest.approx(0.5)
    assert evaluate_detections(counting, three, score_variant="corrected").score == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"tag": "sizes", "include": [include("a")]}, "metadata\\['tag'\\] = 'sizes'; allowed"),
        ({"tag": "colors"}, "metadata\\['include'\\] must be a non-empty list"),
        ({"tag": "colors", "include": [{"class": "a"}]}, "\\['count'\\] = None"),
        ({"tag": "colors", "include": [include("a", colour="red")]}, "unknown keys \\['colour'\\]"),
        ({"tag": "position", "include": [include("a", position=["near", 0])]}, "\\['position'\\]"),
    ],
)
def test_malformed_metadata_names_the_field(metadata, message):
    with pytest.raises(MetadataError, match=message):
        validate_metadata(metadata)


def test_task_summary_is_the_mean_over_tasks():
    md1 = {"tag": "single_object", "include": [include("a")]}
    md2 = {"tag": "counting", "include": [include("a", 2)]}
    results = [
        evaluate_detections(md1, {"a": [det(0, 0)]}),
        evaluate_detections(md1, {}),
        evaluate_detections(md2, {}),
    ]
    summary = task_summary(results)
    assert summary == {"single_object": 0.5, "counting": 0.0, "overall": 0.25}


def test_every_official_geneval_prompt_parses_and_is_judged(shared_data):
    lines = (shared_data / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines()
    classes = (shared_data / "geneval" / "object_names.txt").read_text().splitlines()
    assert len(lines) == 553
    tags = set()
    for line in lines:
        metadata = json.loads(line)
        validate_metadata(metadata, known_classes=classes)
        # A perfect detection set: count objects per class, left to right, with the asked colour.
        detections = {}
        for i, clause in enumerate(metadata["include"]):
            objs = [det(100 * i + 30 * k, 0, color=clause.get("color")) for k in range(clause["count"])]
            detections[clause["class"]] = objs
        result = evaluate_detections(metadata, detections)
        tags.add(metadata["tag"])
        if "position" not in json.dumps(metadata["include"]):
            assert result.correct, (metadata["prompt"], result.reason)
    assert len(tags) == 6
