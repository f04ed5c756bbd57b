"""Speed of random-sequential Fermi imitation at L = 100: our mesa model (numba kernel over NumPy arrays)
against a plain per-agent mesa implementation (CellAgents on an OrthogonalVonNeumannGrid, every elementary
update in Python), measured in the same run. Same rule, same r and K, and every implementation starts from
the same lattice: a random one relaxed for --relax-mcs MCS first (untimed), since a relaxed lattice has
fewer C-D pairs to update and so runs faster for all three.

    .venv/bin/python benchmarks/pgg_fermi_speed.py               # about a minute on an idle core
    .venv/bin/python benchmarks/pgg_fermi_speed.py --size 50 --agent-mcs 1 --fast-mcs 100
"""

import argparse
import math
import time

import mesa
from mesa.discrete_space import CellAgent, OrthogonalVonNeumannGrid

from apps.public_goods.experiments import make_model
from apps.public_goods.fermi import random_sequential_kernel
from apps.public_goods.model import GROUP_SIZE, GameConfig, group_counts


class Player(CellAgent):
    def __init__(self, model, cell, cooperates: bool):
        super().__init__(model)
        self.cell = cell
        self.cooperates = cooperates

    def payoff(self) -> float:
        m = self.model
        total = 0.0
        for centre in [self.cell, *self.cell.neighborhood]:  # the 5 groups that contain this player
            n_c = centre.agents[0].cooperates + sum(c.agents[0].cooperates for c in centre.neighborhood)
            total += m.r * n_c / GROUP_SIZE - self.cooperates
        return total

    def imitate(self) -> None:
        other = self.random.choice(list(self.cell.neighborhood)).agents[0]
        if other.cooperates == self.cooperates:
            return
        z = (self.payoff() - other.payoff()) / self.model.k
        if z < 700 and self.random.random() < 1.0 / (1.0 + math.exp(z)):
            self.cooperates = other.cooperates


class AgentPGG(mesa.Model):
    """The textbook mesa way: one agent per site, one MCS = L^2 random agents imitate once each."""

    def __init__(self, strategy, r: float, k: float, seed: int):
        super().__init__(seed=seed)
        self.r, self.k = r, k
        self.grid = OrthogonalVonNeumannGrid(strategy.shape, torus=True, random=self.random)
        for cell in self.grid.all_cells:
            Player(self, cell, bool(strategy[cell.coordinate]))
        self.players = list(self.agents)
        self.datacollector = mesa.DataCollector(
            model_reporters={"cooperation": lambda m: sum(a.cooperates for a in m.players) / len(m.players)}
        )

    def step(self) -> None:
        for _ in range(len(self.players)):
            self.random.choice(self.players).imitate()
        self.datacollector.collect(self)


def rate(fn, steps: int) -> float:
    start = time.perf_counter()
    fn(steps)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--r", type=float, default=4.5)
    parser.add_argument("--agent-mcs", type=int, default=2, help="MCS of the per-agent model")
    parser.add_argument("--fast-mcs", type=int, default=300, help="MCS of ours")
    parser.add_argument("--relax-mcs", type=int, default=300, help="untimed MCS before the common start")
    args = parser.parse_args()
    for name in ("agent_mcs", "fast_mcs", "relax_mcs"):  # a rate over 0 MCS; relax also compiles numba
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    config = GameConfig(size=args.size, r=args.r)
    ours = make_model(config, seed=0)
    relax = args.relax_mcs
    ours.run(relax)  # numba compiles (or loads its cache) here, outside the timing
    start = ours.strategy.copy()
    print(f"common start: cooperation {start.mean():.3f} after {relax} untimed MCS")
    s, nc = start.copy(), group_counts(start)
    updates = args.size**2
    ours_rate = rate(ours.run, args.fast_mcs)

    def kernel_only(steps: int) -> None:
        for step in range(steps):
            random_sequential_kernel(s, nc, args.r / GROUP_SIZE, float(GROUP_SIZE), 0.5, updates, step)

    kernel_rate = rate(kernel_only, args.fast_mcs)
    agents = AgentPGG(start, args.r, 0.5, seed=0)
    agent_rate = rate(lambda n: [agents.step() for _ in range(n)], args.agent_mcs)

    print(f"Fermi random sequential, L = {args.size}, r = {args.r}, K = 0.5 (MCS = L^2 elementary updates)")
    print(f"{'implementation':<44} {'MCS/s':>10} {'vs per-agent':>13}")
    for name, value in [
        ("per-agent mesa (CellAgent, Python loop)", agent_rate),
        ("ours: PublicGoodsModel.step (numba)", ours_rate),
        ("ours: numba kernel alone", kernel_rate),
    ]:
        print(f"{name:<44} {value:>10.2f} {value / agent_rate:>12.0f}x")


if __name__ == "__main__":
    main()
