"""Prompt sets: verified loading (never the network), the real files' counts, the GenEval generator."""

from __future__ import annotations

import collections
import io
import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import BENCHMARKS
from benchmarks.prompt_sets import sets
from benchmarks.prompt_sets.geneval import (
    FLOWGRPO_TASK_WEIGHTS,
    GenEvalPromptGenerator,
    load_metadata,
    prompt_text,
)
from benchmarks.prompt_sets.sets import GenEvalPromptSet, drawbench, ocr, pickapic
from harness import data_files as files
from harness.data_files import FILES, PromptFile, PromptFileError, fetch, sha256_of
from harness.geneval_rules import TASKS, MetadataError, load_class_names, validate_metadata
from harness.types import Prompt, RewardSpec

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_prompts.txt"
FIXTURE_SHA = "18893fb02a0239298d7ed2d1b39f43467c06eb8a90cb862cb9b59a0ecc6bc0be"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt fails like an offline machine."""

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(files.urllib.request, "urlopen", offline)


@pytest.fixture
def fixture_dir(tmp_path) -> Path:
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "prompts.txt").write_bytes(FIXTURE.read_bytes())
    return tmp_path


# --- file loading and checksums ------------------------------------------------------------------


def test_every_shared_file_matches_its_pinned_checksum(shared_data):
    for file in FILES.values():
        if file.sha256 is not None:
            path, digest = fetch(file, shared_data)
            assert digest == file.sha256 == sha256_of(path)


def test_checksum_mismatch_names_the_file_and_both_hashes(fixture_dir):
    assert fetch(PromptFile("tiny/prompts.txt", "https://example.invalid/p.txt", FIXTURE_SHA), fixture_dir)[1] == (
        FIXTURE_SHA
    )
    wrong = PromptFile("tiny/prompts.txt", "https://example.invalid/p.txt", "0" * 64)
    with pytest.raises(PromptFileError, match=f"expected {'0' * 64}, got {FIXTURE_SHA}"):
        fetch(wrong, fixture_dir)


def test_missing_local_file_names_the_path_and_the_source(tmp_path):
    file = PromptFile("tiny/absent.txt", "https://example.invalid/absent.txt", FIXTURE_SHA)
    with pytest.raises(PromptFileError, match=r"absent\.txt not found.*https://example\.invalid/absent\.txt"):
        fetch(file, tmp_path)


def test_offline_download_names_the_url_and_how_to_pass_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFRL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(PromptFileError, match=r"raw\.githubusercontent\.com/.*ocr/test\.txt.*data_dir="):
        fetch("flow_grpo/ocr_test.txt")
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_download_goes_to_the_cache_and_is_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(files.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(FIXTURE.read_bytes()))
    good = PromptFile("tiny/prompts.txt", "https://example.invalid/p.txt", FIXTURE_SHA)
    path, _ = fetch(good)
    assert path == tmp_path / "cache" / "prompt_sets" / "tiny" / "prompts.txt" and path.read_bytes()
    corrupt = PromptFile("tiny/other.txt", "https://example.invalid/o.txt", "f" * 64)
    with pytest.raises(PromptFileError, match="does not match"):
        fetch(corrupt)
    assert not (tmp_path / "cache" / "prompt_sets" / "tiny" / "other.txt").exists()


def test_download_writes_a_private_temporary_file(tmp_path, monkeypatch):
    """Another run's half-written ``<name>.part`` is neither overwritten nor renamed into place."""
    monkeypatch.setenv("DIFFRL_CACHE", str(tmp_path))
    folder = tmp_path / "prompt_sets" / "tiny"
    folder.mkdir(parents=True)
    (folder / "prompts.txt.part").write_bytes(b"another download in progress")
    monkeypatch.setattr(files.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(FIXTURE.read_bytes()))
    path, _ = fetch(PromptFile("tiny/prompts.txt", "https://example.invalid/p.txt", FIXTURE_SHA))
    assert path.read_bytes() == FIXTURE.read_bytes()
    assert (folder / "prompts.txt.part").read_bytes() == b"another download in progress"
    assert sorted(p.name for p in folder.iterdir()) == ["prompts.txt", "prompts.txt.part"]  # no leftovers


def test_cached_copy_is_used_without_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFRL_CACHE", str(tmp_path))
    cached = tmp_path / "prompt_sets" / "tiny" / "prompts.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(FIXTURE.read_bytes())
    assert fetch(PromptFile("tiny/prompts.txt", "https://example.invalid/p.txt", FIXTURE_SHA))[0] == cached


# --- the real prompt files -----------------------------------------------------------------------


def test_official_geneval_metadata_parses_and_the_templates_rebuild_every_prompt(shared_data):
    classes = load_class_names(shared_data / "geneval" / "object_names.txt")
    assert len(classes) == 80 and classes[0] == "person" and "computer mouse" in classes
    metadata = load_metadata(shared_data / "geneval" / "evaluation_metadata.jsonl", classes)
    assert len(metadata) == 553
    assert collections.Counter(md["tag"] for md in metadata) == {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }
    assert [md["prompt"] for md in metadata] == [prompt_text(md) for md in metadata]


def test_flowgrpo_geneval_test_file_is_the_official_set_four_times(shared_data):
    official = load_metadata(shared_data / "geneval" / "evaluation_metadata.jsonl")
    flowgrpo = load_metadata(shared_data / "flow_grpo" / "geneval_test_metadata.jsonl")
    assert len(flowgrpo) == 4 * 553
    assert collections.Counter(json.dumps(md, sort_keys=True) for md in flowgrpo) == {
        json.dumps(md, sort_keys=True): 4 for md in official
    }


def test_bad_metadata_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a dog"}\n'
        '{"tag": "colours", "include": [{"class": "dog", "count": 1}], "prompt": "a dog"}\n'
    )
    with pytest.raises(MetadataError, match=r"bad\.jsonl:2: .*'colours'"):
        load_metadata(path)


def test_geneval_set(shared_data):
    bench = BENCHMARKS.get("geneval")(data_dir=shared_data, train_only=True)
    prompts = bench.eval_prompts()
    assert len(prompts) == 553 and bench.images_per_prompt == 4
    assert prompts[0] == Prompt("a photo of a bench", prompts[0].metadata) and prompts[0].tag == "single_object"
    assert bench.version.startswith("2/5c48e0813e81/gen-") and bench.metrics == ("overall", *TASKS)
    train = bench.train_prompts(50, np.random.default_rng(0))
    assert len(train) == 50 and {p.tag for p in train} <= {"position", "counting", "color_attr", "colors", "two_object"}


def test_text_sets_counts(shared_data):
    ocr_set = BENCHMARKS.get("ocr")(data_dir=shared_data, reward=MeanBrightness())
    ocr_prompts = ocr_set.eval_prompts()
    # 1018 prompts; the file has no final newline, so `wc -l` counts 1017.
    assert len(ocr_prompts) == 1018 and ocr_set.images_per_prompt == 1
    assert ocr_prompts[0].metadata["target"] == "Spring Collection 2024"
    assert all(p.metadata["target"] for p in ocr_prompts)
    with pytest.raises(PromptFileError, match="ocr_train.txt not found"):
        ocr_set.train_prompts(2, np.random.default_rng(0))
    with pytest.raises(PromptFileError, match="ocr_train.txt not found"):  # unpinned: its hash needs the file
        _ = ocr_set.version

    draw = drawbench(data_dir=shared_data, reward=MeanBrightness())
    texts = [p.text for p in draw.eval_prompts()]
    assert len(texts) == 200 and len(set(texts)) == 200 and draw.images_per_prompt == 5
    assert len(set(Path(shared_data / "drawbench" / "test.txt").read_text().splitlines())) == 200
    with pytest.raises(ValueError, match="no train split"):
        draw.train_prompts(1, np.random.default_rng(0))

    pick = pickapic(data_dir=shared_data, train_only=True)
    assert len(pick.eval_prompts()) == 2048
    train = pick.train_prompts(10, np.random.default_rng(0))
    assert len(train) == 10 and train == pick.train_prompts(10, np.random.default_rng(0))
    assert len(pick._prompts(pick.train_file)) == 25432


class MeanBrightness:
    """A stand-in reward: mean pixel value."""

    spec = RewardSpec(name="brightness", version="0", description="mean pixel value")

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def test_a_set_without_a_reward_fails_when_built_not_after_sampling(shared_data):
    with pytest.raises(ValueError, match="pass reward=.*or train_only=True"):
        drawbench(data_dir=shared_data)
    with pytest.raises(ValueError, match="pass reward="):
        GenEvalPromptSet(data_dir=shared_data)
    with pytest.raises(ValueError, match="no train split"):
        sets.FilePromptSet(name="eval_only", eval_file="drawbench/test.txt", train_file=None, images_per_prompt=1,
                           train_only=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"registry key 'pickscore'; pass the built reward instead"):
        pickapic(data_dir=shared_data, reward="pickscore")  # benchmarks do not import rewards: the suite builds it
    with pytest.raises(ValueError, match="pass reward="):
        sets.ocr(data_dir=shared_data)  # scored by the OCR reward, which the caller builds
    train_only = pickapic(data_dir=shared_data, train_only=True)
    with pytest.raises(ValueError, match="train_only=True without a reward"):
        train_only.evaluate(torch.zeros(1, 3, 4, 4), [Prompt("x")])


def test_evaluate_averages_the_reward(shared_data):
    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.2, 0.4)])
    assert drawbench(reward=MeanBrightness()).evaluate(images, [Prompt("a"), Prompt("b")]) == {
        "overall": pytest.approx(0.3)
    }
    bench = GenEvalPromptSet(data_dir=shared_data, reward=MeanBrightness())
    images = torch.stack([torch.full((3, 4, 4), v) for v in (1.0, 0.0, 0.0)])
    tags = [Prompt("p", {"tag": "counting"}), Prompt("p", {"tag": "position"}), Prompt("p", {"tag": "position"})]
    assert bench.evaluate(images, tags) == {"overall": 0.5, "counting": 1.0, "position": 0.0}


def test_versions_come_from_the_pins_without_reading_or_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFRL_CACHE", str(tmp_path))  # empty cache, network off (autouse fixture)
    pick = pickapic(train_only=True)
    test, train = FILES["flow_grpo/pickscore_test.txt"].sha256, FILES["flow_grpo/pickscore_train.txt"].sha256
    assert pick.version == f"2/{test[:12]}/train-{train[:12]}"
    assert drawbench(reward=MeanBrightness()).version == f"2/{FILES['drawbench/test.txt'].sha256[:12]}"
    geneval = GenEvalPromptSet(train_only=True)
    assert geneval.version.startswith(f"2/{FILES['geneval/evaluation_metadata.jsonl'].sha256[:12]}/gen-")
    assert not list(tmp_path.rglob("*"))


def test_geneval_version_follows_the_generator_settings(shared_data, tmp_path):
    default = GenEvalPromptSet(train_only=True).version
    assert GenEvalPromptSet(train_only=True, task_weights=dict(FLOWGRPO_TASK_WEIGHTS)).version == default
    assert GenEvalPromptSet(train_only=True, task_weights={"position": 1}).version != default
    assert GenEvalPromptSet(train_only=True, task_weights={"position": 1.0}).version == (
        GenEvalPromptSet(train_only=True, task_weights={"position": 1}).version
    )
    names = tmp_path / "names.txt"
    names.write_text((shared_data / "geneval" / "object_names.txt").read_text())
    assert GenEvalPromptSet(train_only=True, class_names=names).version == default  # same bytes, same prompts
    names.write_text("cat\ndog\nbird\n")
    assert GenEvalPromptSet(train_only=True, class_names=names).version != default


def test_unpinned_ocr_train_file_is_hashed_into_the_version_and_lines_are_stripped(shared_data, tmp_path):
    (tmp_path / "flow_grpo").mkdir()
    (tmp_path / "flow_grpo" / "ocr_test.txt").write_bytes((shared_data / "flow_grpo" / "ocr_test.txt").read_bytes())
    train = tmp_path / "flow_grpo" / "ocr_train.txt"
    train.write_bytes(b'  a sign that says "OPEN"  \r\n\n\t"Sale" poster\t\n   \n')
    bench = ocr(data_dir=tmp_path, train_only=True)
    eval_sha = FILES["flow_grpo/ocr_test.txt"].sha256
    assert bench.version == f"2/{eval_sha[:12]}/train-{sha256_of(train)[:12]}"
    prompts = bench.train_prompts(50, np.random.default_rng(0))
    assert {p.text for p in prompts} == {'a sign that says "OPEN"', '"Sale" poster'}  # FlowGRPO's line.strip()
    assert {p.metadata["target"] for p in prompts} == {"OPEN", "Sale"}
    train.write_bytes(b'a "CLOSED" sign\n')
    assert bench.version.endswith(f"/train-{sha256_of(train)[:12]}")


def test_train_prompts_are_parsed_once(shared_data, monkeypatch):
    sets._prompt_list.cache_clear()
    reads = []
    read_lines = sets.read_lines
    monkeypatch.setattr(sets, "read_lines", lambda *a: reads.append(a[0]) or read_lines(*a))
    pick = pickapic(data_dir=shared_data, train_only=True)
    first = pick.train_prompts(4, np.random.default_rng(0))
    assert pick.train_prompts(4, np.random.default_rng(0)) == first
    pickapic(data_dir=shared_data, train_only=True).train_prompts(4, np.random.default_rng(1))
    assert reads == ["flow_grpo/pickscore_train.txt"]


# --- the GenEval training-prompt generator -------------------------------------------------------


@pytest.fixture
def classes(shared_data) -> tuple[str, ...]:
    return tuple(load_class_names(shared_data / "geneval" / "object_names.txt"))


def test_generator_ratios_follow_flowgrpo_and_are_deterministic_per_seed(classes):
    generator = GenEvalPromptGenerator(classes=classes)
    draws = generator.generate(20_000, 7)
    counts = collections.Counter(md["tag"] for md in draws)
    total = sum(FLOWGRPO_TASK_WEIGHTS.values())
    for tag, weight in FLOWGRPO_TASK_WEIGHTS.items():
        assert counts[tag] / len(draws) == pytest.approx(weight / total, abs=0.012), tag
    assert counts["single_object"] == 0
    assert generator.generate(100, 7) == draws[:100]
    assert generator.generate(100, 8) != draws[:100]
    assert generator.generate(5, np.random.default_rng(3)) == generator.generate(5, 3)


def test_generator_custom_ratios_colours_and_templates(classes):
    generator = GenEvalPromptGenerator(
        classes=classes,
        task_weights={"single_object": 1, "colors": 3},
        colors=("red", "teal"),
        templates={"single_object": "an image of {a}", "colors": "{a}, studio light"},
    )
    draws = generator.generate(4000, 0)
    share = sum(md["tag"] == "colors" for md in draws) / len(draws)
    assert share == pytest.approx(0.75, abs=0.03)
    assert {md["include"][0]["color"] for md in draws if md["tag"] == "colors"} == {"red", "teal"}
    assert all(md["prompt"].startswith("an image of a") for md in draws if md["tag"] == "single_object")
    assert all(md["prompt"].endswith(", studio light") for md in draws if md["tag"] == "colors")
    with pytest.raises(MetadataError, match="unknown task"):
        GenEvalPromptGenerator(classes=classes, task_weights={"colours": 1})
    with pytest.raises(MetadataError, match="templates lack"):
        GenEvalPromptGenerator(classes=classes, templates={"position": "{a} {relation} {b}"})


def test_generated_prompts_are_valid_geneval_metadata(classes):
    draws = GenEvalPromptGenerator(classes=classes, task_weights=dict.fromkeys(TASKS, 1.0)).generate(3000, 1)
    assert {md["tag"] for md in draws} == set(TASKS)
    for md in draws:
        validate_metadata(md, classes)
        assert set(md) <= {"tag", "include", "exclude", "prompt"} and md["prompt"] == prompt_text(md)
        include = md["include"]
        if md["tag"] == "counting":
            assert 2 <= include[0]["count"] <= 4
            assert md["exclude"] == [{"class": include[0]["class"], "count": include[0]["count"] + 1}]
        else:
            assert "exclude" not in md and all(c["count"] == 1 for c in include)
        if md["tag"] in ("two_object", "position", "color_attr"):
            assert include[0]["class"] != include[1]["class"]
        if md["tag"] in ("colors", "color_attr"):
            assert all(c["class"] != "person" and "color" in c for c in include)
        if md["tag"] == "color_attr":
            assert include[0]["color"] != include[1]["color"]
        if md["tag"] == "position":
            assert "position" not in include[0] and include[1]["position"][1] == 0
