"""The compiled build (setup.py) is the one under test when scripts/test says so.

scripts/test runs the suite twice: on the plain package, then with SIDECAR_EXPECT_COMPILED=1 on
scripts/build-compiled's tree. Were that tree's extensions not the ones imported (a wrong
PYTHONPATH, a build that compiled nothing), the second run would test the plain code again.
"""

from __future__ import annotations

import ast
import importlib
import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def compiled_modules() -> list[str]:
    """setup.py's COMPILED, as module names (setup.py runs setup() when imported)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    (paths,) = (
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "COMPILED"
    )
    return [path.removeprefix("src/").removesuffix(".py").replace("/", ".") for path in paths]


def test_every_module_named_for_compiling_exists():
    for path in (ROOT / "src" / name.replace(".", "/") for name in compiled_modules()):
        assert path.with_suffix(".py").is_file(), path


@pytest.mark.parametrize("name", compiled_modules())
def test_the_build_under_test_is_the_one_expected(name: str):
    expect_compiled = os.environ.get("SIDECAR_EXPECT_COMPILED") == "1"
    loaded_from = importlib.import_module(name).__file__ or ""
    assert loaded_from.endswith(tuple(EXTENSION_SUFFIXES)) == expect_compiled, loaded_from
