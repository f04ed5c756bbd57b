"""The spatial public goods game on mesa 3: an L x L torus, von Neumann groups of G = 5, payoffs as data.

Every site x belongs to the 5 groups centred on x and on its 4 neighbours. A cooperator puts `c` into
each group it belongs to; a group's pot `r * c * n_C` is split equally among its 5 members, so

    payoff of x = sum over its 5 groups of (r * c * n_C(group) / 5 - c * s_x),   s_x = 1 for C, 0 for D

with `c = cost` ("per_group", the convention of Szolnoki, Perc & Szabo, PRE 80, 056109, 2009, where
the thresholds 3.74 / 5.49 are for r itself) or `c = cost / 5` ("per_site": one unit split over the
5 groups; payoffs are then 5x smaller, which is the same dynamics as K five times larger).

The grid-wide state is NumPy arrays owned by the model (`strategy`, int8, 1 = C, 0 = D); the update
rule of a step is a separate "dynamics" object (fermi.py, learners.py) picked by name in experiments.py.

    from apps.public_goods.experiments import make_model
    model = make_model(GameConfig(size=50, r=4.5), seed=0); model.run(100)
"""

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

import mesa
import numpy as np

GROUP_SIZE = 5  # von Neumann neighbourhood plus the centre
METHODS = ("fermi", "fermi-sync", "qlearning", "ppo", "grpo", "grpo-gcc")
INITS = ("bernoulli", "half", "all_d", "checkerboard")
COST_CONVENTIONS = ("per_group", "per_site")
GCC_SHAPES = ("parabola", "tent")
ADVANTAGE_GROUPS = ("neighbourhood", "all")
ACTIONS = ("strategy", "keep_switch")


@dataclass
class LatticeSettings:
    """Everything of a game but r and the method (a sweep varies those): lattice, payoffs, initial state,
    and the hyperparameters of every method (one place for each)."""

    size: int = field(default=100, metadata={"help": "L, the side of the L x L torus (the paper: 200)"})
    cost: float = field(
        default=1.0,
        metadata={
            "help": "a cooperator's contribution c (sets Fermi's payoff scale; the learners' rewards are "
            "payoffs / 5c, so c cancels for them)"
        },
    )
    cost_convention: Literal["per_group", "per_site"] = field(
        default="per_group",
        metadata={
            "help": "per_group: c into each of the 5 groups (Szolnoki et al. 2009); per_site: c/5 each "
            "(like cost, no effect on the learners)"
        },
    )
    init: Literal["bernoulli", "half", "all_d", "checkerboard"] = field(
        default="bernoulli",
        metadata={
            "help": "initial state: Bernoulli(p_init) C, left half C / right half D, all D, checkerboard"
        },
    )
    p_init: float = field(default=0.5, metadata={"help": "probability of C for init=bernoulli"})
    noise_k: float = field(default=0.5, metadata={"help": "K, the noise of the Fermi rule"})
    # --- learners (one round = every site picks C or D at once, then one update) ---
    hidden: int = field(default=32, metadata={"help": "width of the shared MLP's two hidden layers"})
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate of the shared MLP"})
    epochs: int = field(default=2, metadata={"help": "gradient updates per round (PPO, GRPO)"})
    clip_eps: float = field(default=0.2, metadata={"help": "clip range of the surrogate (PPO, GRPO)"})
    beta: float = field(default=0.04, metadata={"help": "KL weight to the reference policy (GRPO)"})
    ref_refresh: int = field(default=20, metadata={"help": "refresh the reference policy every K updates"})
    advantage_groups: Literal["neighbourhood", "all"] = field(
        default="neighbourhood",
        metadata={"help": "GRPO groups: each site's 5-site neighbourhood, or all sites as one group"},
    )
    gcc_lambda: float = field(
        default=2.0, metadata={"help": "lambda, strength of the global cooperation bonus (grpo-gcc)"}
    )
    gcc_shape: Literal["parabola", "tent"] = field(
        default="parabola",
        metadata={
            "help": "bonus shape in g: parabola lambda*4g(1-g) (our default) or tent lambda*(1-|2g-1|)"
        },
    )
    action: Literal["strategy", "keep_switch"] = field(
        default="strategy",
        metadata={
            "help": "what the shared-MLP learners' action means: the new strategy C/D (the paper's sibling "
            "code) or keep/switch the site's current one (our option; Fermi and Q-learning ignore it)"
        },
    )
    switch_init: float = field(
        default=0.1,
        metadata={
            "help": "action=keep_switch: a fresh policy's probability of switching (output bias), so the "
            "first rounds inherit the initial lattice"
        },
    )
    gamma: float = field(default=0.9, metadata={"help": "discount of PPO's TD(0) critic and of Q-learning"})
    q_alpha: float = field(default=0.1, metadata={"help": "Q-learning step size"})
    q_epsilon: float = field(default=0.02, metadata={"help": "Q-learning exploration rate"})
    q_init: float = field(
        default=0.0,
        metadata={
            "help": "Q-learning's initial table value; an optimistic one, high against what the payoffs "
            "give (e.g. 30), makes every site try both actions early"
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 3:
            raise ValueError(
                f"size (L) must be an integer >= 3 (von Neumann groups on a torus), got {self.size}"
            )
        check_positive("cost", self.cost)
        check_positive("noise_k (K)", self.noise_k)
        if not 0.0 <= self.p_init <= 1.0:
            raise ValueError(f"p_init must be in [0, 1], got {self.p_init}")
        for name, valid in (
            ("init", INITS),
            ("cost_convention", COST_CONVENTIONS),
            ("gcc_shape", GCC_SHAPES),
            ("advantage_groups", ADVANTAGE_GROUPS),
            ("action", ACTIONS),
        ):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name}: unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        if not 0.0 < self.switch_init < 1.0:
            raise ValueError(
                f"switch_init must be in (0, 1) (a probability, as a logit bias), got {self.switch_init}"
            )
        if self.epochs < 1 or self.ref_refresh < 1 or self.hidden < 1:
            raise ValueError("epochs, ref_refresh and hidden must be >= 1")
        for name in ("gcc_lambda", "beta"):  # a negative bonus would push away from cooperation
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be >= 0 and finite, got {getattr(self, name)}")
        if not 0 <= self.q_epsilon <= 1:
            raise ValueError(f"q_epsilon must be in [0, 1], got {self.q_epsilon}")
        if not 0 <= self.gamma < 1:  # the game never ends: at 1 the values of Q and the critic have no bound
            raise ValueError(f"gamma must be in [0, 1), got {self.gamma}")
        check_positive("lr", self.lr)
        if not 0 < self.clip_eps < 1:  # core.algos.policy_loss: the ratio's lower clip 1 - eps stays > 0
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if not math.isfinite(self.q_init):
            raise ValueError(f"q_init must be finite, got {self.q_init}")
        if not 0 < self.q_alpha <= 1:
            raise ValueError(f"q_alpha must be in (0, 1], got {self.q_alpha}")

    @property
    def cost_per_group(self) -> float:
        return self.cost if self.cost_convention == "per_group" else self.cost / GROUP_SIZE


@dataclass
class GameConfig(LatticeSettings):
    """One game: the lattice settings plus r and the update method."""

    r: float = field(default=4.0, metadata={"help": "multiplication factor r of each group's pot"})
    method: Literal["fermi", "fermi-sync", "qlearning", "ppo", "grpo", "grpo-gcc"] = field(
        default="fermi",
        metadata={
            "help": "update rule: Fermi random sequential / synchronous, Q-learning, PPO, GRPO, GRPO-GCC"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_r_and_method(self.r, self.method)


def check_positive(name: str, value: float) -> None:
    """`value` must be a finite number > 0: NaN fails `value > 0`, but inf does not."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0 and finite, got {value}")


def check_r_and_method(r: float, method: str) -> None:
    check_positive("r", r)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


# -------------------------------------------------------------------------------------------------
# Pure lattice functions
# -------------------------------------------------------------------------------------------------


def neighbour_sum(a: np.ndarray) -> np.ndarray:
    """Sum of the 4 von Neumann neighbours on the torus, (L, L) -> (L, L)."""
    return np.roll(a, 1, 0) + np.roll(a, -1, 0) + np.roll(a, 1, 1) + np.roll(a, -1, 1)


def group_counts(strategy: np.ndarray) -> np.ndarray:
    """n_C of the group centred on each site (the site and its 4 neighbours), (L, L) int -> (L, L) int."""
    s = strategy.astype(np.int32)
    return s + neighbour_sum(s)


def payoffs(strategy: np.ndarray, r: float, cost_per_group: float) -> np.ndarray:
    """Total payoff of every site over its 5 groups, (L, L) -> (L, L) float64.
    The groups containing x are centred on x and on its neighbours, so sum_groups n_C = nc[x] + sum nc[y]."""
    nc = group_counts(strategy)  # (L, L)
    pooled = nc + neighbour_sum(nc)  # (L, L) sum of n_C over the 5 groups of each site
    return r * cost_per_group * pooled / GROUP_SIZE - GROUP_SIZE * cost_per_group * strategy


def mean_payoff(cooperation: float, r: float, cost_per_group: float) -> float:
    """Mean payoff from the cooperation rate alone: every C puts c into 5 groups, which pay out r c each,
    so sum of payoffs = 5 N_C c (r - 1)."""
    return GROUP_SIZE * cost_per_group * (r - 1.0) * cooperation


def initial_strategy(config: GameConfig, rng: np.random.Generator) -> np.ndarray:
    """The initial (L, L) int8 lattice. For an odd L the checkerboard has one seam on the torus and the half
    start is below half (floor(L/2) of L columns C)."""
    n = config.size
    i, j = np.indices((n, n))
    if config.init == "bernoulli":
        return (rng.random((n, n)) < config.p_init).astype(np.int8)
    if config.init == "half":
        return (j < n // 2).astype(np.int8)
    if config.init == "all_d":
        return np.zeros((n, n), dtype=np.int8)
    return ((i + j) % 2 == 0).astype(np.int8)


def gcc_bonus(g: float, lam: float, shape: str = "parabola") -> float:
    """The global cooperation constraint (our reading of GRPO-GCC, PAPERS.md sec. 7): a bonus added to
    every cooperator's payoff, strong at intermediate global cooperation g and 0 at g = 0 and g = 1.

    >>> gcc_bonus(0.5, 2.0), gcc_bonus(0.0, 2.0), gcc_bonus(1.0, 2.0), gcc_bonus(0.25, 1.0, "tent")
    (2.0, 0.0, 0.0, 0.5)
    """
    if not 0.0 <= g <= 1.0:
        raise ValueError(f"global cooperation g must be in [0, 1], got {g}")
    if shape == "parabola":
        return lam * 4.0 * g * (1.0 - g)
    if shape == "tent":
        return lam * (1.0 - abs(2.0 * g - 1.0))
    raise ValueError(f"unknown gcc_shape {shape!r}; valid: {', '.join(GCC_SHAPES)}")


# -------------------------------------------------------------------------------------------------
# The mesa model
# -------------------------------------------------------------------------------------------------


class Dynamics(Protocol):
    """An update rule: `step(model)` rewrites `model.strategy` in place (one MCS or one learning round);
    `state_dict` / `load_state_dict` carry what it keeps between steps across a resume."""

    def step(self, model: "PublicGoodsModel") -> dict[str, float]: ...

    def state_dict(self) -> dict:
        """What a resumed run needs beyond the model's lattice and rng, in `RunDir.save_checkpoint`'s
        `hooks_state` form."""
        ...

    def load_state_dict(self, state: dict, model: "PublicGoodsModel") -> None: ...


class PublicGoodsModel(mesa.Model):
    """The lattice game as a mesa model; randomness only from `self.rng` (seeded by `Model(seed=...)`)."""

    def __init__(self, config: GameConfig, dynamics: Dynamics, seed: int | None = None):
        super().__init__(seed=seed)
        self.config = config
        self.dynamics = dynamics
        self.strategy = initial_strategy(config, self.rng)  # (L, L) int8, 1 = C
        self.last_metrics: dict[str, float] = {}
        self.datacollector = mesa.DataCollector(
            model_reporters={"cooperation": "cooperation", "mean_payoff": "mean_payoff"}
        )
        self.datacollector.collect(self)

    @property
    def cooperation(self) -> float:
        return float(self.strategy.mean())

    @property
    def mean_payoff(self) -> float:
        return mean_payoff(self.cooperation, self.config.r, self.config.cost_per_group)

    @property
    def payoff(self) -> np.ndarray:
        """(L, L) payoffs of the current lattice."""
        return payoffs(self.strategy, self.config.r, self.config.cost_per_group)

    @property
    def absorbed(self) -> bool:
        """All C or all D: imitation dynamics can no longer change anything."""
        return self.strategy.min() == self.strategy.max()

    def step(self) -> None:  # mesa counts `self.steps` (done steps, this one included)
        self.last_metrics = self.dynamics.step(self)
        self.datacollector.collect(self)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()
