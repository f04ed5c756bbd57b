"""The lattice game: payoffs against hand-computed lattices and a plain loop, wrap-around, initial states,
the GCC bonus, determinism under a seed and configuration errors."""

import math

import numpy as np
import pytest

from apps.public_goods.experiments import make_model
from apps.public_goods.model import (
    GameConfig,
    gcc_bonus,
    group_counts,
    initial_strategy,
    mean_payoff,
    payoffs,
)


def loop_payoffs(s: np.ndarray, r: float, c: float) -> np.ndarray:
    """Reference: for every group centre, every member pays c if C and gets r c n_C / 5."""
    n = s.shape[0]
    out = np.zeros(s.shape)
    for ci in range(n):
        for cj in range(n):
            members = [
                (ci, cj),
                ((ci + 1) % n, cj),
                ((ci - 1) % n, cj),
                (ci, (cj + 1) % n),
                (ci, (cj - 1) % n),
            ]
            n_c = sum(s[m] for m in members)
            for m in members:
                out[m] += r * c * n_c / 5 - c * s[m]
    return out


def test_payoffs_3x3_one_cooperator_by_hand():
    s = np.zeros((3, 3), dtype=np.int8)
    s[0, 0] = 1
    p = payoffs(s, r=4.0, cost_per_group=1.0)
    # the C is in 5 groups with n_C = 1: 5 * 4/5 - 5; a neighbour (wrap included) shares 3 groups with it,
    # a diagonal site 2
    assert p[0, 0] == pytest.approx(-1.0)
    for site in [(1, 0), (2, 0), (0, 1), (0, 2)]:
        assert p[site] == pytest.approx(2.4)
    for site in [(1, 1), (2, 2), (1, 2), (2, 1)]:
        assert p[site] == pytest.approx(1.6)


def test_payoffs_5x5_wrap_around_by_hand():
    s = np.zeros((5, 5), dtype=np.int8)
    s[0, 0] = s[0, 4] = 1  # neighbours only across the edge
    p = payoffs(s, r=5.0, cost_per_group=1.0)
    assert p[0, 0] == pytest.approx(2.0) and p[0, 4] == pytest.approx(2.0)  # sum n_C = 7: 7 - 5
    assert p[0, 2] == pytest.approx(2.0)  # groups of (0,1) and (0,3) hold one C each
    assert p[1, 4] == pytest.approx(4.0)  # groups of (1,4), (0,4) (two C) and (1,0)
    assert p[2, 2] == pytest.approx(0.0)
    assert group_counts(s)[0, 0] == 2 and group_counts(s)[0, 4] == 2
    per_site = payoffs(s, r=5.0, cost_per_group=GameConfig(cost_convention="per_site").cost_per_group)
    np.testing.assert_allclose(per_site, p / 5)


@pytest.mark.parametrize("n", [3, 4, 7])
def test_payoffs_match_a_plain_loop_and_the_mean_identity(n):
    s = (np.random.default_rng(n).random((n, n)) < 0.5).astype(np.int8)
    p = payoffs(s, r=3.7, cost_per_group=0.6)
    np.testing.assert_allclose(p, loop_payoffs(s, 3.7, 0.6))
    assert p.mean() == pytest.approx(mean_payoff(s.mean(), 3.7, 0.6))


def test_initial_states():
    rng = np.random.default_rng(0)
    half = initial_strategy(GameConfig(size=4, init="half"), rng)
    assert half.tolist() == [[1, 1, 0, 0]] * 4
    board = initial_strategy(GameConfig(size=4, init="checkerboard"), rng)
    assert board.sum() == 8 and board[0, 0] == 1 and board[0, 1] == 0 and board[1, 0] == 0
    assert initial_strategy(GameConfig(size=4, init="all_d"), rng).sum() == 0
    bern = initial_strategy(GameConfig(size=100, init="bernoulli", p_init=0.3), rng)
    assert abs(bern.mean() - 0.3) < 0.02


def test_gcc_bonus_shape():
    g = np.linspace(0, 1, 101)
    bonus = np.array([gcc_bonus(x, 2.0) for x in g])
    assert bonus[0] == 0.0 and bonus[-1] == 0.0 and bonus[50] == pytest.approx(2.0)
    assert bonus.argmax() == 50 and np.allclose(bonus, bonus[::-1])  # peak at g = 1/2, symmetric
    assert gcc_bonus(0.1, 1.0) == pytest.approx(0.36)
    assert gcc_bonus(0.25, 2.0, "tent") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="g must be in"):
        gcc_bonus(1.5, 1.0)
    with pytest.raises(ValueError, match="unknown gcc_shape"):
        gcc_bonus(0.5, 1.0, "box")


@pytest.mark.parametrize("method", ["fermi", "fermi-sync"])
def test_same_seed_same_history_and_datacollector(method):
    config = GameConfig(size=20, r=4.2, method=method)
    runs = []
    for seed in (5, 5, 6):
        model = make_model(config, seed)
        model.run(8)
        runs.append((model.strategy.copy(), model.datacollector.get_model_vars_dataframe()))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1].equals(runs[1][1])
    assert not np.array_equal(runs[0][0], runs[2][0])
    frame = runs[0][1]
    assert list(frame.columns) == ["cooperation", "mean_payoff"] and len(frame) == 9  # t = 0 .. 8
    assert frame["mean_payoff"].iloc[-1] == pytest.approx(payoffs(runs[0][0], 4.2, 1.0).mean())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"size": 2}, "size \\(L\\) must be an integer >= 3"),
        ({"r": 0.0}, "r must be > 0"),
        ({"r": -1.0}, "r must be > 0"),
        ({"method": "sarsa"}, "unknown method 'sarsa'; valid: fermi, fermi-sync"),
        ({"init": "random"}, "unknown init"),
        ({"r": math.inf}, "r must be > 0 and finite, got inf"),
        ({"r": math.nan}, "r must be > 0 and finite, got nan"),
        ({"cost": math.inf}, "cost must be > 0 and finite, got inf"),
        ({"noise_k": 0.0}, "noise_k"),
        ({"noise_k": math.inf}, "noise_k \\(K\\) must be > 0 and finite, got inf"),
        ({"gcc_lambda": -1.0}, "gcc_lambda must be >= 0 and finite, got -1.0"),
        ({"gcc_lambda": math.inf}, "gcc_lambda must be >= 0 and finite, got inf"),
        ({"beta": math.inf}, "beta must be >= 0 and finite, got inf"),
        ({"gamma": 1.5}, "gamma must be in \\[0, 1\\)"),
        ({"gamma": 1.0}, "gamma must be in \\[0, 1\\), got 1.0"),  # a game without end: no bound on Q
        ({"gamma": math.nan}, "gamma must be in \\[0, 1\\)"),
        ({"q_epsilon": math.nan}, "q_epsilon must be in \\[0, 1\\]"),
        ({"q_epsilon": -0.1}, "q_epsilon"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": math.inf}, "lr must be > 0 and finite, got inf"),
        ({"q_alpha": 5.0}, "q_alpha must be in \\(0, 1\\]"),
        ({"clip_eps": 1.5}, "clip_eps must be in \\(0, 1\\)"),
    ],
)
def test_bad_configuration_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        GameConfig(**fields)


def test_the_bounds_of_q_alpha_and_coop_threshold_are_allowed():
    """q_alpha in (0, 1] and coop_threshold in (0, 1]: 1 itself is valid for both."""
    from apps.public_goods.experiments import SweepSettings

    assert GameConfig(method="qlearning", q_alpha=1.0).q_alpha == 1.0
    assert SweepSettings(coop_threshold=1.0).coop_threshold == 1.0
