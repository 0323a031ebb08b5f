"""Suite files are validated before any compute: every kind of mistake names its key and the fix."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import yaml

from harness.config import ConfigError
from harness.suite import builtin_suites, load_suite, validate_suite
from methods import METHODS
from methods.base import Capabilities

VALID = {
    "name": "unit",
    "benchmark": {"name": "shapes", "options": {"prompts_per_task": 1, "images_per_prompt": 1}},
    "rewards": {"shapes_geneval": {"options": {"judgement": "correct"}}},
    "methods": [
        {"label": "nft", "method": "diffusion_nft", "config": {"num_steps": 2}},
        {"label": "grpo", "method": "flow_grpo", "config": {"num_steps": 2}, "eval_cfg": 4.5},
    ],
    "seeds": [0, 1],
    "budget": {"unit": "fwd_equiv", "amount": 1000, "eval_at": [0.5, 1.0]},
    "report": {"reference": "grpo"},
}


def with_change(path: str, value: object) -> dict:
    """VALID with ``value`` at a dotted ``path`` (list indices allowed); value DELETE removes the key."""
    data = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node: object = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})  # type: ignore[index]
    key = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]  # type: ignore[index]
    else:
        node[key] = value  # type: ignore[index]
    return data


DELETE = object()


def test_the_valid_suite_builds_every_method_config():
    suite = validate_suite(VALID)
    assert suite.method_configs["nft"].num_steps == 2
    assert suite.eval_settings("grpo").guidance_scale == 4.5
    assert suite.resolved()["methods"][0]["config"]["beta"] == 1.0  # defaults are filled in
    assert suite.cell_fingerprint("nft", 0) != suite.cell_fingerprint("nft", 1)


def test_fingerprint_of_a_cell_ignores_other_variants_and_the_report():
    base = validate_suite(VALID)
    more = validate_suite(with_change("methods", [*VALID["methods"], {"label": "x", "method": "diffusion_nft"}]))
    assert base.cell_fingerprint("nft", 0) == more.cell_fingerprint("nft", 0)
    other_budget = validate_suite(with_change("budget.amount", 2000))
    assert base.cell_fingerprint("nft", 0) != other_budget.cell_fingerprint("nft", 0)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("seed", [0], "unknown key suite.seed. Did you mean 'seeds'?"),
        ("methods.0.confg", {}, "unknown key suite.methods[0].confg. Did you mean 'config'?"),
        ("methods.0.config.betta", 0.1, "unknown key suite.methods[0].config.betta. Did you mean 'beta'?"),
        ("budget.amout", 5, "unknown key suite.budget.amout. Did you mean 'amount'?"),
        ("benchmark.options.prompts_per_tsk", 2, "suite.benchmark.options.prompts_per_tsk. Did you mean"),
        ("rewards.shapes_geneval.options.judgment", "correct", "Did you mean 'judgement'?"),
    ],
)
def test_unknown_keys_get_a_did_you_mean(path, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        validate_suite(with_change(path, value))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("budget.amount", "lots", r"suite\.budget\.amount = 'lots'; expected a number"),
        ("seeds", "0", r"suite\.seeds = '0'; expected a list"),
        ("train.prompts_per_iteration", 2.5, r"suite\.train\.prompts_per_iteration = 2\.5; expected an integer"),
        ("methods.0.config.num_steps", "ten", r"suite\.methods\[0\]\.config\.num_steps = 'ten'; expected an integer"),
        ("methods.0.config.loss_space", "eps", r"loss_space = 'eps'; allowed: 'x0', 'v'"),
        ("budget.unit", "gpu_hours", r"suite\.budget\.unit = 'gpu_hours'; allowed: 'fwd_equiv'"),
        ("rewards.shapes_geneval.options.judgement", "best", r"judgement = 'best'; allowed: 'score', 'correct'"),
        ("train.optim.lr", "1e-4", r"suite\.train\.optim\.lr = '1e-4'; expected a number"),
    ],
)
def test_wrong_types_name_the_key_and_the_expected_type(path, value, message):
    with pytest.raises(ConfigError, match=message):
        validate_suite(with_change(path, value))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            "methods.0.method",
            "diffusion_nf",
            r"suite\.methods\[0\]\.method: unknown method 'diffusion_nf'.*diffusion_nft",
        ),
        ("benchmark.name", "shape", r"suite\.benchmark\.name: unknown benchmark 'shape'"),
        ("rewards", {"pickscor": {}}, r"suite\.rewards\.pickscor: unknown reward 'pickscor'"),
        ("eval.sampler", "heun", r"suite\.eval\.sampler = 'heun': sampler must be one of euler"),
        ("methods.0.config.sampler", "heun", r"suite\.methods\[0\]\.config\.sampler = 'heun'[:;] .*euler"),
        ("trackers", ["tensorbord"], r"suite\.trackers\[0\] = 'tensorbord'; allowed: .*tensorboard"),
        ("report.reference", "flowgrpo", r"suite\.report\.reference = 'flowgrpo'; allowed: nft, grpo"),
        ("report.metric", "accuracy", r"suite\.report\.metric = 'accuracy'; allowed: overall"),
    ],
)
def test_unknown_names_are_refused_with_what_is_allowed(path, value, message):
    with pytest.raises(ConfigError, match=message):
        validate_suite(with_change(path, value))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("name", DELETE, r"missing key suite\.name"),
        ("budget", DELETE, r"missing key suite\.budget"),
        ("methods.1.label", "nft", r"suite\.methods\[1\]\.label = 'nft' is used twice"),
        ("methods", [], r"suite\.methods is empty"),
        ("rewards", {}, r"suite\.rewards is empty"),
        ("seeds", [0, 0], r"suite\.seeds = \[0, 0\]: seeds must be distinct"),
        ("budget.amount", 0, r"suite\.budget\.amount = 0: amount must be a finite number > 0, got 0\.0"),
        ("budget.eval_at", [0.5, 0.25], r"suite\.budget\.eval_at = \[0\.5, 0\.25\]: eval_at must be increasing"),
        ("methods.1.eval_cfg", 0.5, r"suite\.methods\[1\]\.eval_cfg = 0\.5: eval_cfg must be a finite number >= 1"),
        (
            "train.images_per_prompt",
            1,
            r"suite\.train\.images_per_prompt = 1: images_per_prompt must be an integer >= 2",
        ),
        ("methods.0.label", "a b", r"suite\.methods\[0\]\.label = 'a b': label must be letters"),
        ("model.device", "cuda:63", r"suite\.model\.device = 'cuda:63', but this machine has \d+ CUDA device"),
        ("model.device", "gpu", r"suite\.model\.device = 'gpu'; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'"),
        ("model.finetune", "lora", r"suite\.model\.finetune = 'lora'"),
        ("model.checkpoint", "/nonexistent/base", r"suite\.model\.checkpoint = '/nonexistent/base' is not"),
        ("name", "My Suite", r"suite\.name = 'My Suite': name must be lower-case"),
        ("eval.grids", -1, r"suite\.eval\.grids = -1: grids must be an integer >= 0"),
        ("report.target", float("inf"), r"suite\.report\.target = inf: target must be a finite number"),
    ],
)
def test_inconsistent_values_are_refused(path, value, message):
    with pytest.raises(ConfigError, match=message):
        validate_suite(with_change(path, value))


@pytest.mark.parametrize("device", ["auto", "cpu", *(["cuda", "cuda:0"] if torch.cuda.is_available() else [])])
def test_the_tiny_dit_runs_on_any_device_this_machine_has(device):
    assert validate_suite(with_change("model.device", device)).config.model.device == device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_for_the_tiny_dit_is_refused_where_there_is_none():
    with pytest.raises(ConfigError, match=r"suite\.model\.device = 'cuda', but this machine has 0 CUDA device\(s\)"):
        validate_suite(with_change("model.device", "cuda"))


@dataclass(frozen=True, kw_only=True)
class _LogProbConfig:
    sampler: str = "flow_sde"
    ema_interval: int = 1


class _NeedsLogProb:
    """A registered-for-the-test method that needs transition log-probs and takes a sampler."""

    Config: ClassVar[type] = _LogProbConfig
    capabilities: ClassVar[Capabilities] = Capabilities(needs_log_prob=True, sampler_field="sampler")


class _NeedsGradients:
    Config: ClassVar[type] = _LogProbConfig
    capabilities: ClassVar[Capabilities] = Capabilities(needs_differentiable_reward=True, sampler_field="sampler")


@pytest.fixture
def test_methods():
    with (
        METHODS.temporarily("needs_log_prob", f"{__name__}:_NeedsLogProb"),
        METHODS.temporarily("needs_gradients", f"{__name__}:_NeedsGradients"),
    ):
        yield


def test_a_log_prob_method_with_a_deterministic_sampler_is_refused(test_methods):
    ok = with_change("methods.0", {"label": "a", "method": "needs_log_prob", "config": {"sampler": "cps"}})
    assert validate_suite(ok).method_configs["a"].sampler == "cps"
    bad = with_change("methods.0", {"label": "a", "method": "needs_log_prob", "config": {"sampler": "euler"}})
    with pytest.raises(ConfigError, match=r"config\.sampler = 'euler' is deterministic.*allowed: flow_sde, cps"):
        validate_suite(bad)


def test_a_reward_backprop_method_needs_a_differentiable_reward(test_methods):
    bad = with_change("methods.0", {"label": "a", "method": "needs_gradients"})
    with pytest.raises(ConfigError, match=r"backpropagates through the reward.*\['shapes_geneval'\] are not"):
        validate_suite(bad)


def test_a_variant_can_train_on_its_own_rewards(test_methods):
    """``methods[i].rewards`` replaces suite.rewards for that variant only, and is checked like it."""
    own = {"label": "a", "method": "needs_gradients", "rewards": {"shapes_classifier": {"weight": 1.0}}}
    suite = validate_suite(with_change("methods.0", own))
    assert suite.config.methods[0].rewards is not None and "shapes_classifier" in suite.config.methods[0].rewards
    assert suite.config.methods[1].rewards is None  # the other variant keeps suite.rewards
    plain = dict(own, rewards={"shapes_geneval": {}})
    with pytest.raises(ConfigError, match=r"methods\[0\].*\['shapes_geneval'\] are not.*methods\[0\]\.rewards"):
        validate_suite(with_change("methods.0", plain))
    with pytest.raises(ConfigError, match=r"methods\[0\]\.rewards is empty"):
        validate_suite(with_change("methods.0", dict(own, rewards={})))
    with pytest.raises(
        ConfigError, match=r"methods\[0\]\.rewards\.shapes_clasifier: unknown reward.*Did you mean 'shapes_classifier'"
    ):
        validate_suite(with_change("methods.0", dict(own, rewards={"shapes_clasifier": {}})))


def test_yaml_errors_duplicate_keys_and_missing_files(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(VALID) + "seeds: [3]\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'seeds' at line \d+ \(first at line \d+\)"):
        load_suite(path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_suite(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_suite(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_suite(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="shapes_quick"):
        load_suite("shapes_quik")


def test_builtin_suites_are_valid():
    assert {"shapes_quick", "shapes_full"} <= set(builtin_suites())
    for name in builtin_suites():
        suite = load_suite(name)
        assert suite.name == name
        assert len(suite.config.seeds) >= 2


@pytest.mark.parametrize(
    ("term", "message"),
    [
        ({"normalize": "fixed_range"}, r"normalize 'fixed_range' takes range: \[low, high\]"),
        ({"range": [0, 1]}, r"and only it does \(got normalize 'none'"),
        (
            {"normalize": "fixed_range", "range": [1, 0]},
            r"suite\.rewards\.shapes_geneval\.range = \[1, 0\]: range must",
        ),
        (
            {"weight": float("nan")},
            r"suite\.rewards\.shapes_geneval\.weight = nan: weight must be a finite number >= 0",
        ),
        ({"weight": -1}, r"suite\.rewards\.shapes_geneval\.weight = -1: weight must be a finite number >= 0"),
        ({"normalize": "zscore"}, r"normalize = 'zscore'; allowed: 'none', 'fixed_range', 'running'"),
    ],
)
def test_reward_normalisation_options_are_checked(term, message):
    with pytest.raises(ConfigError, match=message):
        validate_suite(with_change("rewards.shapes_geneval", {"options": {"judgement": "correct"}, **term}))
