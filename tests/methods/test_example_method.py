"""The README's "Adding a method" example is a complete method: one file plus its registry line."""

import re
from pathlib import Path

import pytest

from methods import METHODS
from tests.methods import test_contract
from tests.methods.example_method import AboveMean, AboveMeanConfig

ROOT = Path(__file__).resolve().parents[2]


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Adding a method") : text.index("## Adding a reward")]


def test_the_readme_shows_exactly_the_tested_file_and_its_registry_line():
    blocks = re.findall(r"```python\n(.*?)```", readme_section(), flags=re.S)
    file_block, registry_block = blocks
    assert file_block == "# methods/above_mean.py\n" + (ROOT / "tests/methods/example_method.py").read_text()
    lines = [line for line in registry_block.splitlines() if line and not line.startswith("#")]
    assert lines == [
        "from methods.above_mean import AboveMean",
        'METHODS.add("above_mean", AboveMean, "flow matching on each prompt group\'s better-than-average samples")',
    ]


def test_registered_it_passes_the_contract_tests(tiny_policy):
    with METHODS.temporarily("above_mean", AboveMean):
        test_contract.test_declares_its_contract("above_mean")
        test_contract.test_two_iterations_through_the_loop("above_mean", tiny_policy)
    assert "above_mean" not in METHODS


def test_its_config_refuses_bad_values():
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1, got 0"):
        AboveMeanConfig(num_steps=0)
