"""Public prompt sets as benchmarks: GenEval, OCR, DrawBench and Pick-a-Pic.

Each set offers the :class:`benchmarks.base.Benchmark` members: ``name``, ``version``,
``images_per_prompt``, ``eval_seed``, ``train_prompts(n, rng)``, ``eval_prompts()``. ``version``
names the exact prompts: the SHA-256 prefixes of the eval and train files (taken from their pins, so
reading it downloads nothing; only FlowGRPO's unpinned OCR train file is read and hashed) and, for
GenEval, a hash of the training-prompt generator's settings. The sets hold prompts only; their
``evaluate`` scores with the ``reward`` they are given (a built :class:`harness.types.Reward`; a
suite names it by registry key in ``benchmark.options.reward`` and builds it, as benchmarks do not
import rewards) and reports ``overall`` = the mean score, or for GenEval
the unweighted mean of the six per-task means (GenEval's "Overall score"), which equals official
GenEval when the reward returns the official 0/1 ``correct``. A set built without a reward raises at
once (before any image is sampled), unless it is built ``train_only=True`` for its training prompts.
Files load lazily, on first use (see :mod:`harness.data_files`); each file's prompts are
parsed once per process.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.prompt_sets.geneval import FLOWGRPO_TASK_WEIGHTS, GenEvalPromptGenerator, load_metadata
from harness.data_files import FILES, fetch, read_lines, sha256_of
from harness.geneval_rules import TASKS, load_class_names
from harness.ocr_rules import ocr_target
from harness.types import Prompt, Reward, check_scores

VERSION = "2"  # 2: lines are stripped (FlowGRPO's line.strip()); the train file and generator join the version


def _check_reward(reward: Reward | None, train_only: bool, name: str) -> None:
    """At build time: a set that will be evaluated needs a reward, a built one (benchmarks do not import rewards)."""
    if isinstance(reward, str):
        raise ValueError(
            f"prompt set {name!r} got the reward registry key {reward!r}; pass the built reward instead "
            f"(rewards.REWARDS.get({reward!r})()), or name it in a suite as benchmark.options.reward, "
            "which the suite builds"
        )
    if reward is None and not train_only:
        raise ValueError(
            f"prompt set {name!r} holds prompts only and scores its eval images with a reward, but none was "
            "given: pass reward=<a built Reward> (a suite: benchmark.options.reward = a registry key such as "
            "'pickscore'), or train_only=True to use only its training prompts"
        )


def _reward(reward: Reward | None, name: str) -> Reward:
    if reward is None:
        raise ValueError(f"prompt set {name!r} was built train_only=True without a reward: it cannot evaluate")
    return reward


def _file_digest(key: str, data_dir: str | Path | None) -> str:
    """A prompt file's SHA-256: its pin (no I/O; every read is verified against it), else the file's own hash."""
    pinned = FILES[key].sha256
    return pinned if pinned is not None else fetch(key, data_dir)[1]


def _score(reward: Reward, images: Tensor, prompts: Sequence[Prompt]) -> Tensor:
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return check_scores(reward.spec.name, reward(images, prompts), images.shape[0])


def _uniform_draw(pool: Sequence[Prompt], n: int, rng: np.random.Generator) -> list[Prompt]:
    return [pool[int(i)] for i in rng.integers(len(pool), size=n)]


@functools.cache
def _prompt_list(
    key: str, data_dir: str | Path | None, deduplicate: bool, needs_quoted_target: bool
) -> tuple[Prompt, ...]:
    """A file's prompts, parsed once per process (Pick-a-Pic's train file has 25,432)."""
    lines = read_lines(key, data_dir)[0]
    if deduplicate:
        lines = list(dict.fromkeys(lines))
    if not needs_quoted_target:
        return tuple(Prompt(line) for line in lines)
    return tuple(Prompt(line, {"target": ocr_target(line)}) for line in lines)  # raises without a quoted target


@dataclass(frozen=True, kw_only=True)
class FilePromptSet:
    """A set of plain-text prompt files, one prompt per line (OCR, DrawBench, Pick-a-Pic).

    ``deduplicate`` keeps the first occurrence of each eval prompt (DrawBench's file lists each of
    its 200 prompts 5 times; with ``images_per_prompt=5`` the eval draws the same 1000 images).
    ``needs_quoted_target`` checks at load time that every prompt has an OCR target and stores it
    as ``metadata["target"]``. ``train_only`` allows ``reward=None`` (then ``evaluate`` raises).
    """

    name: str
    eval_file: str
    train_file: str | None
    images_per_prompt: int
    eval_seed: int = 42
    deduplicate: bool = False
    needs_quoted_target: bool = False
    data_dir: str | Path | None = None
    reward: Reward | None = None
    train_only: bool = False
    metrics: tuple[str, ...] = ("overall",)

    def __post_init__(self) -> None:
        if self.train_only and self.train_file is None:
            raise ValueError(f"prompt set {self.name!r} has no train split, so train_only=True leaves nothing to use")
        _check_reward(self.reward, self.train_only, self.name)

    @property
    def version(self) -> str:
        """``2/<eval sha[:12]>[/train-<train sha[:12]>]``; only an unpinned file is read (and maybe downloaded)."""
        version = f"{VERSION}/{_file_digest(self.eval_file, self.data_dir)[:12]}"
        if self.train_file is not None:
            version += f"/train-{_file_digest(self.train_file, self.data_dir)[:12]}"
        return version

    def _prompts(self, key: str) -> list[Prompt]:
        deduplicate = self.deduplicate and key == self.eval_file
        return list(_prompt_list(key, self.data_dir, deduplicate, self.needs_quoted_target))

    def eval_prompts(self) -> list[Prompt]:
        return self._prompts(self.eval_file)

    def train_prompts(self, n: int, rng: np.random.Generator) -> list[Prompt]:
        """``n`` prompts drawn uniformly with replacement from the train file."""
        if self.train_file is None:
            raise ValueError(f"prompt set {self.name!r} has no train split; train on another set")
        pool = _prompt_list(self.train_file, self.data_dir, False, self.needs_quoted_target)
        return _uniform_draw(pool, n, rng)

    def evaluate(self, images: Tensor, prompts: Sequence[Prompt]) -> dict[str, float]:
        return {"overall": _score(_reward(self.reward, self.name), images, prompts).mean().item()}


def ocr(
    data_dir: str | Path | None = None, reward: Reward | None = None, eval_seed: int = 42,
    train_only: bool = False,
) -> FilePromptSet:  # fmt: skip
    """FlowGRPO's OCR set: 1018 test prompts (the file has no final newline, so ``wc -l`` says 1017); train by URL.

    Its metric is the OCR reward: pass ``reward=OCRReward()`` (in a suite, ``benchmark.options.reward: ocr``).
    The train file has no pinned SHA-256 yet, so ``version`` reads (and if needed downloads) it to hash it.
    """
    return FilePromptSet(
        name="ocr",
        eval_file="flow_grpo/ocr_test.txt",
        train_file="flow_grpo/ocr_train.txt",
        images_per_prompt=1,
        eval_seed=eval_seed,
        needs_quoted_target=True,
        data_dir=data_dir,
        reward=reward,
        train_only=train_only,
    )


def drawbench(data_dir: str | Path | None = None, reward: Reward | None = None, eval_seed: int = 42) -> FilePromptSet:
    """DrawBench as DiffusionNFT ships it: 200 unique prompts × 5 images (eval only)."""
    return FilePromptSet(
        name="drawbench",
        eval_file="drawbench/test.txt",
        train_file=None,
        images_per_prompt=5,
        eval_seed=eval_seed,
        deduplicate=True,
        data_dir=data_dir,
        reward=reward,
    )


def pickapic(
    data_dir: str | Path | None = None, reward: Reward | None = None, eval_seed: int = 42,
    train_only: bool = False,
) -> FilePromptSet:  # fmt: skip
    """FlowGRPO's Pick-a-Pic prompts: 25432 train, 2048 test (1 image each)."""
    return FilePromptSet(
        name="pickapic",
        eval_file="flow_grpo/pickscore_test.txt",
        train_file="flow_grpo/pickscore_train.txt",
        images_per_prompt=1,
        eval_seed=eval_seed,
        data_dir=data_dir,
        reward=reward,
        train_only=train_only,
    )


@functools.cache
def _geneval_eval(data_dir: str | Path | None, class_names: str | Path | None) -> tuple[Prompt, ...]:
    path, _ = fetch("geneval/evaluation_metadata.jsonl", data_dir)
    return tuple(Prompt(md["prompt"], md) for md in load_metadata(path, load_class_names(class_names, data_dir)))


@dataclass(frozen=True, kw_only=True)
class GenEvalPromptSet:
    """GenEval: the official 553 eval prompts × 4 images; training prompts from the generator.

    ``task_weights`` sets the generator's task mix (FlowGRPO's by default); ``class_names`` is a
    path to ``object_names.txt`` (default: the verified public file). ``train_only`` allows
    ``reward=None`` (then ``evaluate`` raises).
    """

    name: str = "geneval"
    images_per_prompt: int = 4
    eval_seed: int = 42
    data_dir: str | Path | None = None
    class_names: str | Path | None = None
    task_weights: dict[str, float] | None = None
    reward: Reward | None = None
    train_only: bool = False
    metrics: tuple[str, ...] = ("overall", *TASKS)

    def __post_init__(self) -> None:
        _check_reward(self.reward, self.train_only, self.name)

    def _generator_settings(self) -> dict[str, Any]:
        """Every generator argument except the class list (the one source for both the generator and ``version``)."""
        defaults = {
            f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc,operator]
            for f in dataclasses.fields(GenEvalPromptGenerator)
            if f.name != "classes"
        }
        weights = FLOWGRPO_TASK_WEIGHTS if self.task_weights is None else self.task_weights
        return {**defaults, "task_weights": {tag: float(w) for tag, w in weights.items()}}

    @property
    def version(self) -> str:
        """``2/<eval sha[:12]>/gen-<hash>``: the hash covers the generator settings and the class-name file."""
        names = "geneval/object_names.txt"
        classes = _file_digest(names, self.data_dir) if self.class_names is None else sha256_of(Path(self.class_names))
        settings = json.dumps({**self._generator_settings(), "classes_sha256": classes}, sort_keys=True)
        generator = hashlib.sha256(settings.encode()).hexdigest()[:12]
        return f"{VERSION}/{_file_digest('geneval/evaluation_metadata.jsonl', self.data_dir)[:12]}/gen-{generator}"

    @functools.cached_property
    def generator(self) -> GenEvalPromptGenerator:
        """The training-prompt generator over GenEval's 80 classes."""
        classes = tuple(load_class_names(self.class_names, self.data_dir))
        return GenEvalPromptGenerator(classes=classes, **self._generator_settings())

    def eval_prompts(self) -> list[Prompt]:
        return list(_geneval_eval(self.data_dir, self.class_names))

    def train_prompts(self, n: int, rng: np.random.Generator) -> list[Prompt]:
        return [Prompt(md["prompt"], md) for md in self.generator.generate(n, rng)]

    def evaluate(self, images: Tensor, prompts: Sequence[Prompt]) -> dict[str, float]:
        scores = _score(_reward(self.reward, self.name), images, prompts)
        tags = [p.tag for p in prompts]
        per_task = {t: scores[torch.tensor([x == t for x in tags])].mean().item() for t in TASKS if t in tags}
        return {"overall": float(np.mean(list(per_task.values()))), **per_task}
