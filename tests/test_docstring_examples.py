"""The examples in the docstrings of core, apps and reward_models run as tests: pytest collects only tests/,
so without this a wrong example would stay wrong (dashboards' run in tests/dashboards/test_dash_loading.py)."""

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for package in ("core", "apps", "reward_models")
    for path in (ROOT / package).rglob("*.py")
    if ">>> " in path.read_text(encoding="utf-8")
)


def test_the_modules_with_examples_are_found():
    assert {"core.answers", "apps.math_reasoning.evaluate", "apps.tcm.rewards"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
