"""core/registry.py: names are unique, listed sorted, and `in` asks about names."""

import pytest

from core import algos
from core.registry import Registry


def first(x):
    return x


def second(x):
    return -x


def test_a_name_registered_twice_is_refused_and_the_first_entry_stays():
    registry = Registry("widget")
    registry.register("a")(first)
    with pytest.raises(ValueError, match=r"^widget 'a' is registered twice$"):
        registry.register("a")(second)
    assert registry.get("a") is first and registry.names() == ["a"]


def test_names_are_sorted_whatever_the_registration_order():
    registry = Registry("widget")
    for name in ("zeta", "alpha", "mid"):
        registry.register(name)(first)
    assert registry.names() == ["alpha", "mid", "zeta"]
    with pytest.raises(ValueError, match=r"^unknown widget 'nope'; valid: alpha, mid, zeta$"):
        registry.get("nope")


def test_in_asks_about_names_not_functions():
    registry = Registry("widget")
    registry.register("a")(first)
    assert "a" in registry and "b" not in registry and first not in registry
    assert "k3" in algos.KL_ESTIMATORS and "nope" not in algos.KL_ESTIMATORS
    assert algos.kl_k3 not in algos.KL_ESTIMATORS


def test_register_returns_the_function_so_it_works_as_a_decorator():
    """`@registry.register(name)` must leave the decorated name bound to the function, not None."""
    registry = Registry("widget")
    assert registry.register("a")(first) is first

    @registry.register("b")
    def third(x):
        return 2 * x

    assert third(3) == 6 and registry.get("b") is third


def test_the_empty_name_is_unknown_like_any_other():
    """get("") is an unknown name, not a pass to a missing entry."""
    registry = Registry("widget")
    with pytest.raises(ValueError, match=r"^unknown widget ''; valid: $"):
        registry.get("")
    registry.register("a")(first)
    with pytest.raises(ValueError, match=r"^unknown widget ''; valid: a$"):
        registry.get("")
