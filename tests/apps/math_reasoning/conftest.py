"""Tiny untrained math models shared by the math tests: same tokenizer, two sizes (no SFT: seconds)."""

import pytest

from apps.math_reasoning.data import offline_sets
from apps.math_reasoning.models import TinySpec, build_base_model
from apps.math_reasoning.templates import get_template


def _tiny_dir(root, hidden: int, seed: int):
    sets = offline_sets(1234, 20, 10, 20)
    return build_base_model(root, TinySpec(hidden, 1, 0, 1e-3), sets, get_template("r1_short"), 0.0, seed)


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory):
    return _tiny_dir(tmp_path_factory.mktemp("math-small") / "model", 32, 0)


@pytest.fixture(scope="session")
def large_dir(tmp_path_factory):
    return _tiny_dir(tmp_path_factory.mktemp("math-large") / "model", 64, 1)
