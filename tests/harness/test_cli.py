"""The ``diffrl`` command line: user errors print one line and exit 2 (tracebacks only with -v), --version,
defaults in --help, and ``diffrl geneval`` checking its folder and local class names before any download."""

from __future__ import annotations

import importlib.util
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import harness.cli as cli
import harness.data_files as data_files
from harness.cli import USER_ERROR, main

METADATA = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """An empty download cache, and no network: every download fails as it would offline. Returns the cache."""

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("DIFFRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    return tmp_path / "cache"


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A valid GenEval image folder: one prompt, one image."""
    from PIL import Image

    folder = tmp_path / "images" / "00000"
    (folder / "samples").mkdir(parents=True)
    (folder / "metadata.jsonl").write_text(json.dumps(METADATA) + "\n")
    Image.new("RGB", (8, 8)).save(folder / "samples" / "0000.png")
    return folder.parent


def one_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The single stderr line of a user error (no traceback), without its ``diffrl <command>: `` prefix."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"diffrl {command}: "), lines[0]
    return lines[0].removeprefix(f"diffrl {command}: ")


def test_geneval_on_a_missing_folder_says_so_before_any_download(offline, capsys, monkeypatch):
    monkeypatch.setattr(data_files, "download", lambda *a: pytest.fail("downloaded before checking the folder"))
    assert main(["geneval", "/nonexistent"]) == USER_ERROR
    assert one_line(capsys, "geneval") == "GenEval image folder /nonexistent does not exist or is not a directory"


def test_offline_geneval_without_class_names_says_where_to_put_them(offline, image_folder, capsys):
    assert main(["geneval", str(image_folder), "--backend", "hf"]) == USER_ERROR
    message = one_line(capsys, "geneval")
    assert message.startswith("GenEval's class names: could not download geneval/object_names.txt")
    assert str(offline / "prompt_sets" / "geneval" / "object_names.txt") in message and "--class-names" in message


@pytest.mark.skipif(importlib.util.find_spec("mmdet") is not None, reason="mmdet is installed here")
@pytest.mark.parametrize("where", ["cache", "data_dir", "flag"])
def test_local_class_names_are_used_offline_and_a_missing_extra_is_one_line(
    where, offline, image_folder, shared_data, tmp_path, capsys
):
    names = shared_data / "geneval" / "object_names.txt"
    flags = []
    if where == "cache":  # the documented local path: $DIFFRL_CACHE/prompt_sets/geneval/object_names.txt
        (offline / "prompt_sets" / "geneval").mkdir(parents=True)
        (offline / "prompt_sets" / "geneval" / "object_names.txt").write_bytes(names.read_bytes())
    else:
        flags = ["--data-dir", str(shared_data)] if where == "data_dir" else ["--class-names", str(names)]
    assert main(["geneval", str(image_folder), *flags, "--detector", str(tmp_path / "ckpt.pth")]) == USER_ERROR
    assert one_line(capsys, "geneval").startswith("GenEval detector needs the package 'mmdet'; install it with")


def test_verbose_keeps_the_traceback(capsys):
    assert main(["-v", "geneval", "/nonexistent"]) == USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" in err and "FolderError" in err
    assert err.strip().splitlines()[-1].startswith("diffrl geneval: GenEval image folder /nonexistent")
    assert main(["geneval", "/nonexistent", "-v"]) == USER_ERROR  # -v after the command works too
    assert "Traceback" in capsys.readouterr().err


def test_missing_packages_and_command_messages_are_user_errors_but_bugs_are_not(monkeypatch, capsys):
    def missing(args):
        raise ModuleNotFoundError("No module named 'wandb'", name="wandb")

    monkeypatch.setattr(cli, "cmd_list", missing)
    assert main(["list", "rewards"]) == USER_ERROR
    assert one_line(capsys, "list").startswith("needs the package 'wandb', which is not installed")

    def stop(args):
        raise SystemExit("that folder is not a suite folder")

    monkeypatch.setattr(cli, "cmd_list", stop)
    assert main(["list", "rewards"]) == USER_ERROR
    assert one_line(capsys, "list") == "that folder is not a suite folder"

    def bug(args):
        raise ModuleNotFoundError("No module named 'harness.nothing'", name="harness.nothing")

    monkeypatch.setattr(cli, "cmd_list", bug)
    with pytest.raises(ModuleNotFoundError):  # our own module missing is a bug: the traceback stays
        main(["list", "rewards"])
    monkeypatch.setattr(cli, "cmd_list", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["list", "rewards"])


def test_serving_a_reward_to_other_hosts_needs_a_token(monkeypatch, capsys):
    monkeypatch.delenv("DIFFRL_REWARD_TOKEN", raising=False)
    assert main(["serve-reward", "shapes_geneval", "--host", "0.0.0.0"]) == USER_ERROR
    assert "refusing to serve on '0.0.0.0' without a token" in one_line(capsys, "serve-reward shapes_geneval")
    assert main(["serve-reward", "shapes_genevl"]) == USER_ERROR
    assert "unknown reward" in one_line(capsys, "serve-reward shapes_genevl")


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"diffrl {cli.version()}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 20)" in text and "default: 0" in text  # --iterations; --seed, which has no help text
    assert "(default: None)" not in text and "(default: False)" not in text
    with pytest.raises(SystemExit):
        main(["geneval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: mmdet)" in text and "$DIFFRL_CACHE/prompt_sets/geneval/object_names.txt" in text
    with pytest.raises(SystemExit) as stop:
        main(["train", "shapes", "--iterations", "many"])
    assert stop.value.code == USER_ERROR  # argparse's own usage errors exit 2 as well


def test_pretrain_set_overrides_the_recipe_and_names_a_bad_field(monkeypatch, capsys, tmp_path):
    import benchmarks.shapes.pretrain as pretraining

    seen = {}
    monkeypatch.setattr(pretraining, "pretrain", lambda cfg, out, resume: seen.setdefault("cfg", cfg) and out)
    assert main(["pretrain", "shapes", "--steps", "7", "--set", "caption_noise_scope=same_objects",
                 "--set", "caption_noise=0.3", "--out", str(tmp_path)]) == 0  # fmt: skip
    assert (seen["cfg"].steps, seen["cfg"].caption_noise, seen["cfg"].caption_noise_scope) == (7, 0.3, "same_objects")
    assert main(["pretrain", "shapes", "--set", "caption_nois=0.3", "--out", str(tmp_path)]) == USER_ERROR
    assert "Did you mean 'caption_noise'?" in capsys.readouterr().err


def test_pretrain_resume_of_another_recipe_is_a_user_error(monkeypatch, capsys, tmp_path):
    import benchmarks.shapes.pretrain as pretraining
    from harness.config import ConfigError

    def refuse(cfg, out, resume):
        raise ConfigError(f"{out}/resume.pt was written by another recipe (differs in ['pretrain.lr'])")

    monkeypatch.setattr(pretraining, "pretrain", refuse)
    assert main(["pretrain", "shapes", "--resume", "--out", str(tmp_path)]) == USER_ERROR
    assert "diffrl pretrain: " in capsys.readouterr().err  # one line, no traceback
