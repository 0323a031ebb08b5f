"""Code-shape rules the maintainers keep: short functions (import layers are import-linter's, in `make test`)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("methods", "rewards", "benchmarks", "harness")
MAX_LINES = 80


def functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node))
    return found


def test_no_function_is_longer_than_80_lines_without_saying_why():
    long = [
        f"{where} ({node.end_lineno - node.lineno + 1} lines)"
        for where, node in functions()
        if node.end_lineno - node.lineno + 1 > MAX_LINES and "Long because:" not in (ast.get_docstring(node) or "")
    ]
    assert not long, "split these, or give the reason in the docstring ('Long because: ...'): " + "; ".join(long)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_parses_and_the_package_is_found(package):
    assert (ROOT / package / "__init__.py").is_file()
