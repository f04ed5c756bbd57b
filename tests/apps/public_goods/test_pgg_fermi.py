"""Fermi imitation: the probability, the numba kernel's one-update statistics against the exact transition
probabilities, its bookkeeping, and the synchronous variant against a plain loop with the same draws."""

import math
import subprocess
import sys

import numpy as np
import pytest

from apps.public_goods.experiments import make_model
from apps.public_goods.fermi import fermi_probability, random_sequential_kernel
from apps.public_goods.model import GameConfig, group_counts, payoffs

NEIGHBOURS = [(-1, 0), (1, 0), (0, -1), (0, 1)]


def test_fermi_probability():
    assert fermi_probability(1.0, 1.0, 0.5) == 0.5
    assert fermi_probability(0.0, 1.0, 0.5) == pytest.approx(1 / (1 + math.exp(-2)))  # y richer: likely
    assert fermi_probability(1.0, 0.0, 0.5) == pytest.approx(1 / (1 + math.exp(2)))
    assert fermi_probability(1e6, 0.0, 0.1) == 0.0  # no overflow
    assert fermi_probability(0.0, 1e6, 0.1) == 1.0


def test_one_elementary_update_has_the_exact_transition_probabilities():
    """Over many seeds, the chance that one update flips site x equals (1/N)(1/4) sum_y W(P_x, P_y)."""
    r, k = 3.8, 0.5
    s0 = (np.random.default_rng(1).random((4, 4)) < 0.5).astype(np.int8)
    p = payoffs(s0, r, 1.0)
    n = 4
    exact = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            for di, dj in NEIGHBOURS:
                y = ((i + di) % n, (j + dj) % n)
                if s0[y] != s0[i, j]:
                    exact[i, j] += fermi_probability(p[i, j], p[y], k) / (4 * n * n)
    trials = 10000
    flips = np.zeros((n, n))
    nc0 = group_counts(s0)
    for seed in range(trials):
        s = s0.copy()
        random_sequential_kernel(s, nc0.copy(), r / 5, 5.0, k, 1, seed)
        flips += s != s0
    freq = flips / trials
    sigma = np.sqrt(exact * (1 - exact) / trials)
    assert np.all(np.abs(freq - exact) <= 5 * sigma + 1e-9)
    assert abs(freq.sum() - exact.sum()) < 5 * math.sqrt(exact.sum() / trials)


def test_kernel_keeps_group_counts_in_step():
    s = (np.random.default_rng(2).random((12, 12)) < 0.5).astype(np.int8)
    nc = group_counts(s)
    changes = random_sequential_kernel(s, nc, 4.0 / 5, 5.0, 0.5, 5000, 3)
    assert changes > 0
    np.testing.assert_array_equal(nc, group_counts(s))


def test_synchronous_step_matches_a_plain_loop_with_the_same_draws():
    config = GameConfig(size=6, r=4.4, method="fermi-sync")
    model = make_model(config, seed=9)
    before = model.strategy.copy()
    rng = np.random.default_rng()
    rng.bit_generator.state = model.rng.bit_generator.state  # replay the model's draws
    d, u = rng.integers(4, size=(6, 6)), rng.random((6, 6))
    p = payoffs(before, 4.4, 1.0)
    expected = before.copy()
    for i in range(6):
        for j in range(6):
            y = ((i + NEIGHBOURS[d[i, j]][0]) % 6, (j + NEIGHBOURS[d[i, j]][1]) % 6)
            if u[i, j] < fermi_probability(p[i, j], p[y], 0.5):
                expected[i, j] = before[y]
    model.step()
    np.testing.assert_array_equal(model.strategy, expected)


def test_imitation_keeps_absorbing_states():
    model = make_model(GameConfig(size=10, r=4.0, init="all_d"), seed=0)
    model.run(3)
    assert model.cooperation == 0.0 and model.absorbed
    model = make_model(GameConfig(size=10, r=4.0, init="all_d"), seed=0)
    model.strategy[...] = 1  # all C: nobody to imitate but cooperators
    model.run(3)
    assert model.cooperation == 1.0 and model.absorbed
    assert not make_model(GameConfig(size=10, r=4.0, init="checkerboard"), seed=0).absorbed


def test_one_mcs_calls_the_kernel_with_rc_over_5_and_l_squared_updates(monkeypatch):
    """One step of `fermi` is one Monte Carlo step: L^2 elementary updates with rc5 = r c / 5, five_c = 5 c."""
    from apps.public_goods import fermi

    calls = []

    def recording(s, nc, rc5, five_c, k, updates, seed):
        calls.append((s.shape, rc5, five_c, k, updates))
        np.testing.assert_array_equal(nc, group_counts(s))
        return 7

    config = GameConfig(size=6, r=4.5, cost=2.0, noise_k=0.3)
    model = make_model(config, seed=0)  # first: building the dynamics compiles the real kernel
    monkeypatch.setattr(fermi, "random_sequential_kernel", recording)
    assert model.config.cost_per_group == 2.0
    model.run(2)
    assert calls == [((6, 6), pytest.approx(4.5 * 2.0 / 5), pytest.approx(10.0), 0.3, 36)] * 2
    assert model.last_metrics["changes"] == pytest.approx(7 / 36)


def test_per_site_cost_reaches_the_kernel_as_cost_over_5(monkeypatch):
    """per_site: c = cost / 5 in each group, so rc5 = r cost / 25 and five_c = cost."""
    from apps.public_goods import fermi

    calls = []

    def recording(s, nc, rc5, five_c, k, updates, seed):
        calls.append((rc5, five_c))
        return 0

    model = make_model(GameConfig(size=5, r=4.5, cost=2.0, cost_convention="per_site"), seed=0)
    monkeypatch.setattr(fermi, "random_sequential_kernel", recording)
    model.step()
    assert calls == [(pytest.approx(4.5 * 2.0 / 25), pytest.approx(2.0))]


def test_synchronous_step_reports_the_fraction_of_sites_that_changed():
    model = make_model(GameConfig(size=6, r=4.4, method="fermi-sync"), seed=9)
    before = model.strategy.copy()
    model.step()
    changed = float((model.strategy != before).mean())
    assert changed == pytest.approx(10 / 36)  # this seed's history: 10 of the 36 sites imitate
    assert model.last_metrics["changes"] == pytest.approx(changed)


def test_at_vanishing_noise_one_update_flips_exactly_the_sites_with_a_richer_unlike_neighbour():
    """K -> 0: x imitates y only when P_y > P_x, so the sites that one update can flip are exactly those with
    an unlike neighbour richer than themselves (by `payoffs`, which test_pgg_model.py checks against a plain
    loop; every unlike pair here differs by >= 0.32, far beyond K). Each such site flips in a given update
    with probability >= 1/64, so over 3000 kernel seeds every one of them is seen, and no other site: the
    kernel's own payoffs must agree. (The K = 0.5 statistics above miss a wrong neighbour in them.)"""
    r, k, n = 3.8, 1e-3, 4
    s0 = (np.random.default_rng(12).random((n, n)) < 0.5).astype(np.int8)
    p = payoffs(s0, r, 1.0)
    can_flip = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(n):
            for di, dj in NEIGHBOURS:
                y = ((i + di) % n, (j + dj) % n)
                if s0[y] != s0[i, j]:
                    assert abs(p[y] - p[i, j]) > 0.3
                    can_flip[i, j] |= bool(p[y] > p[i, j])
    assert can_flip.sum() == 11  # and 5 sites that no update can flip
    flipped = np.zeros((n, n), dtype=bool)
    nc0 = group_counts(s0)
    for seed in range(3000):
        s = s0.copy()
        random_sequential_kernel(s, nc0.copy(), r / 5, 5.0, k, 1, seed)
        flipped |= s != s0
    np.testing.assert_array_equal(flipped, can_flip)


def test_the_kernel_is_compiled_when_the_dynamics_is_built_before_a_run_is_timed():
    """The first run of a process counted numba's compile (or cache load) in its time: 2 s for 20 steps."""
    script = (
        "from apps.public_goods.fermi import FermiRandomSequential, random_sequential_kernel as kernel\n"
        "before = len(kernel.signatures)\n"
        "FermiRandomSequential()\n"
        "print(before, len(kernel.signatures))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "1"]
