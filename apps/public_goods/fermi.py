"""Fermi imitation on the lattice: the exact random-sequential dynamics (numba) and the synchronous variant.

Random sequential (Szolnoki, Perc & Szabo, PRE 80, 056109, 2009): pick a site x uniformly, one of its
4 neighbours y uniformly; x adopts y's strategy with probability W = 1 / (1 + exp((P_x - P_y) / K)),
P the total payoff over the 5 groups. One Monte Carlo step (MCS) = L^2 such elementary updates.

The kernel keeps `nc` (n_C of the group centred on each site) up to date, so a payoff costs 5 reads:
P_x = r c / 5 * (nc[x] + sum_y nc[y]) - 5 c s_x. A pair with equal strategies is skipped without
computing W (it cannot change anything), which is the same Markov chain.
Randomness: numba's own generator, seeded at each call from the model's `rng`: a seed gives one history.

    python -c "from apps.public_goods.fermi import fermi_probability; print(fermi_probability(0.0, 1.0, 0.5))"
"""

import math

import numba
import numpy as np

from apps.public_goods.model import GROUP_SIZE, group_counts, payoffs

_DI = np.array([-1, 1, 0, 0], dtype=np.int64)
_DJ = np.array([0, 0, -1, 1], dtype=np.int64)


def fermi_probability(p_x: float, p_y: float, k: float) -> float:
    """Probability that x adopts y's strategy, 1 / (1 + exp((P_x - P_y) / K)), overflow-safe.

    >>> fermi_probability(1.0, 1.0, 0.5)
    0.5
    """
    z = (p_x - p_y) / k
    if z > 700.0:  # exp would overflow: the probability is 0 to double precision
        return 0.0
    return 1.0 / (1.0 + math.exp(z))


@numba.njit(cache=True)
def _site_payoff(s, nc, i, j, n, rc5, five_c):
    pooled = nc[i, j] + nc[(i - 1) % n, j] + nc[(i + 1) % n, j] + nc[i, (j - 1) % n] + nc[i, (j + 1) % n]
    return rc5 * pooled - five_c * s[i, j]


@numba.njit(cache=True)
def random_sequential_kernel(s, nc, rc5, five_c, k, updates, seed):
    """`updates` elementary Fermi updates in place on s (L, L) int8 and nc (L, L) int32; returns the
    number of strategy changes. rc5 = r c / 5, five_c = 5 c."""
    np.random.seed(seed)
    n = s.shape[0]
    changes = 0
    for _ in range(updates):
        i = np.random.randint(n)
        j = np.random.randint(n)
        d = np.random.randint(4)
        yi = (i + _DI[d]) % n
        yj = (j + _DJ[d]) % n
        if s[i, j] == s[yi, yj]:
            continue
        z = (_site_payoff(s, nc, i, j, n, rc5, five_c) - _site_payoff(s, nc, yi, yj, n, rc5, five_c)) / k
        if z < 700.0 and np.random.random() * (1.0 + math.exp(z)) < 1.0:
            delta = 1 if s[yi, yj] == 1 else -1
            s[i, j] = s[yi, yj]
            # x's change moves n_C of the 5 groups that contain x: those centred on x and its neighbours
            nc[i, j] += delta
            nc[(i - 1) % n, j] += delta
            nc[(i + 1) % n, j] += delta
            nc[i, (j - 1) % n] += delta
            nc[i, (j + 1) % n] += delta
            changes += 1
    return changes


class Stateless:
    """Dynamics whose every draw comes from the model's rng: a checkpoint of the model is all a resume needs."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, model) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but was given {sorted(state)}")


class FermiRandomSequential(Stateless):
    """One step = one MCS (L^2 elementary updates) of random-sequential Fermi imitation."""

    def __init__(self):
        # numba compiles (or loads from its cache) the kernel at its first call: here, before a run's clock
        # starts, so that its time counts steps only (the first run of a process took 2 s for 20 steps)
        random_sequential_kernel(np.zeros((2, 2), np.int8), np.zeros((2, 2), np.int32), 1.0, 1.0, 1.0, 0, 0)

    def step(self, model) -> dict[str, float]:
        cfg = model.config
        c = cfg.cost_per_group
        nc = group_counts(model.strategy)  # (L, L) int32, rebuilt per step: 2e-5 s, the MCS costs 1e-3 s
        seed = int(model.rng.integers(2**62))  # numba's np.random.seed keeps its low 32 bits
        updates = cfg.size * cfg.size
        changes = random_sequential_kernel(
            model.strategy, nc, cfg.r * c / GROUP_SIZE, GROUP_SIZE * c, cfg.noise_k, updates, seed
        )
        return {"changes": changes / updates}


class FermiSynchronous(Stateless):
    """All sites at once: every x draws one neighbour y and adopts its strategy with the Fermi probability,
    all payoffs taken from the lattice before the step (a common, not equivalent, variant)."""

    def step(self, model) -> dict[str, float]:
        cfg = model.config
        n = cfg.size
        s = model.strategy
        p = payoffs(s, cfg.r, cfg.cost_per_group)  # (L, L)
        d = model.rng.integers(4, size=(n, n))  # (L, L) which neighbour
        i, j = np.indices((n, n))
        yi, yj = (i + _DI[d]) % n, (j + _DJ[d]) % n  # (L, L)
        z = np.clip((p - p[yi, yj]) / cfg.noise_k, -700.0, 700.0)
        adopt = model.rng.random((n, n)) < 1.0 / (1.0 + np.exp(z))  # (L, L)
        new = np.where(adopt, s[yi, yj], s)
        changes = float((new != s).mean())
        model.strategy[...] = new
        return {"changes": changes}
