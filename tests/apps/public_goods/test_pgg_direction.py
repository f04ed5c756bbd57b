"""The direction experiment's pieces: time to cooperation on hand-made series, the per-seed summary, and the
keep/switch action on tiny lattices (hand-checked)."""

import math

import numpy as np
import pytest

from apps.public_goods.experiments import (
    make_model,
    summarize,
    summary_markdown,
    thresholds,
    time_to_cooperation,
)
from apps.public_goods.learners import apply_action
from apps.public_goods.model import GameConfig


@pytest.mark.parametrize(
    ("series", "threshold", "expected"),
    [
        ([0.0, 0.1, 0.3, 0.6, 0.7, 0.9], 0.5, 3),  # all-D start, rises and stays
        ([0.0, 0.6, 0.4, 0.55, 0.5, 0.8], 0.5, 3),  # a dip below resets the clock; 0.5 itself counts
        ([0.5, 0.52, 0.51], 0.5, 0),  # a half start that never drops: cooperative from the start
        ([0.5, 0.49, 0.9, 0.9], 0.5, 2),
        ([0.0, 0.9, 0.9, 0.4], 0.5, None),  # ends below: never reached
        ([0.0, 0.0, 0.0], 0.5, None),
        ([0.0, 0.6, 0.85, 0.95], 0.8, 2),  # another threshold
        ([1.0], 0.5, 0),
    ],
)
def test_time_to_cooperation_by_hand(series, threshold, expected):
    assert time_to_cooperation(series, threshold) == expected


def test_time_to_cooperation_needs_a_series():
    with pytest.raises(ValueError, match="non-empty"):
        time_to_cooperation([])


def test_summary_over_seeds_by_hand():
    rows = [
        {"method": "grpo-gcc", "init": "all_d", "r": 3.0, "mean_cooperation": 0.9, "time_to_cooperation": 4},
        {"method": "grpo-gcc", "init": "all_d", "r": 3.0, "mean_cooperation": 0.7, "time_to_cooperation": 8},
        {"method": "ppo", "init": "all_d", "r": 3.0, "mean_cooperation": 0.0, "time_to_cooperation": ""},
    ]
    gcc, ppo = summarize(rows)
    assert (gcc["cooperation"], gcc["time"], gcc["reached"], gcc["seeds"]) == pytest.approx((0.8, 6.0, 2, 2))
    assert gcc["cooperation_std"] == pytest.approx(math.sqrt(0.02)) and gcc["time_std"] == pytest.approx(
        math.sqrt(8)
    )
    assert ppo["reached"] == 0 and math.isnan(ppo["time"]) and ppo["cooperation_std"] == 0.0
    table = summary_markdown([gcc, ppo]).splitlines()
    assert table[2] == "| grpo-gcc | all_d | 3 | 0.80 ± 0.14 | 6 ± 3 | 2/2 |"
    assert table[3] == "| ppo | all_d | 3 | 0.00 | never | 0/1 |"  # one seed: no spread to show
    one_reached = summarize([rows[0], {**rows[1], "time_to_cooperation": ""}])
    assert summary_markdown(one_reached).splitlines()[2] == "| grpo-gcc | all_d | 3 | 0.80 ± 0.14 | 4 | 1/2 |"


def test_apply_action_on_a_3x3_lattice_by_hand():
    s = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=np.int8)
    a = np.array([[1, 1, 0], [0, 0, 1], [0, 1, 1]], dtype=np.int8)
    assert apply_action(s, a, "strategy").tolist() == a.tolist()
    # keep (0) leaves the site, switch (1) flips it: C -> D at (0,0), (2,1); D -> C at (0,1), (1,2), (2,2)
    assert apply_action(s, a, "keep_switch").tolist() == [[0, 1, 0], [0, 1, 1], [1, 0, 1]]
    with pytest.raises(ValueError, match="unknown action 'flip'"):
        apply_action(s, a, "flip")


@pytest.mark.parametrize("method", ["ppo", "grpo", "grpo-gcc"])
def test_keep_switch_first_round_inherits_the_initial_lattice(method):
    """A fresh keep/switch policy switches with probability about switch_init: near 0 every site keeps its
    initial strategy, near 1 every site flips; with action=strategy round one is a coin flip per site."""
    lattice = {}
    for p in (1e-4, 1 - 1e-4):
        model = make_model(
            GameConfig(size=8, r=4.0, method=method, init="half", action="keep_switch", switch_init=p), 0
        )
        initial = model.strategy.copy()
        model.step()
        lattice[p] = model.strategy.copy()
        assert model.last_metrics["switch_frac"] == pytest.approx(float((model.strategy != initial).mean()))
        expected = initial if p < 0.5 else 1 - initial
        assert (model.strategy != expected).sum() <= 1  # 64 sites, each off with probability ~1e-4
    model = make_model(GameConfig(size=8, r=4.0, method=method, init="all_d"), 0)
    model.step()
    assert 0.2 < model.cooperation < 0.8  # the fresh strategy policy forgets the all-D start at once


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("switch_init", 0.0, "switch_init"),
        ("switch_init", 1.0, "switch_init must be in \\(0, 1\\)"),  # log(p / (1 - p)) would divide by 0
        ("action", "flip", "unknown action"),
    ],
)
def test_bad_action_settings_are_clear_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        GameConfig(size=5, method="grpo", **{field: value})


def test_thresholds_by_hand():
    """Two seeds per r: r_C brackets between the largest r where C died in every seed and the next r where
    C survived in every seed (a split r is neither); r_D likewise for D. Other methods/inits are ignored."""
    finals = {
        3.0: (0.0, 0.0),
        3.5: (0.0, 0.0),
        3.8: (0.0, 0.2),
        4.0: (0.3, 0.5),
        5.0: (0.9, 1.0),
        5.5: (1.0, 1.0),
    }
    rows = [
        {"method": "fermi", "init": "bernoulli", "r": r, "final_cooperation": c}
        for r, seeds in finals.items()
        for c in seeds
    ]
    rows += [
        {"method": "ppo", "init": "bernoulli", "r": 3.9, "final_cooperation": 0.0},
        {"method": "fermi", "init": "half", "r": 3.9, "final_cooperation": 0.0},
        {"method": "fermi", "init": "half", "r": 4.5, "final_cooperation": 0.6},
    ]
    assert thresholds(rows) == {"r_C": [3.5, 4.0], "r_D": [4.0, 5.5]}
    # ends the grid does not reach are nan
    half = thresholds(rows, init="half")
    assert half["r_C"] == [3.9, 4.5]
    assert half["r_D"][0] == 4.5 and math.isnan(half["r_D"][1])
    ppo = thresholds(rows, method="ppo")
    assert ppo["r_C"][0] == 3.9 and math.isnan(ppo["r_C"][1])
    assert ppo["r_D"][0] == 3.9 and math.isnan(ppo["r_D"][1])
    grpo = thresholds([{"method": "grpo", "init": "bernoulli", "r": 4.2, "final_cooperation": 0.4}], "grpo")
    assert math.isnan(grpo["r_C"][0]) and grpo["r_C"][1] == 4.2
