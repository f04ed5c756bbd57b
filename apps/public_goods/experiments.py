"""Experiments on the public goods game: one run, a sweep in parallel processes, and the threshold estimate.

    grpo-suite public-goods run --r 4.5 --method fermi --steps 1000      # live progress, run directory
    grpo-suite public-goods sweep --preset validation                    # Fermi thresholds, L = 100
    grpo-suite public-goods plot --run-dir runs/public_goods/<ts>        # figures into the run directory

A run directory holds config.json, metrics.jsonl (one line per logged step), snapshots.npz (the lattice at
t = 0, 1, 10, 100, 1000 when reached), eval.json and status.json; a sweep's holds results.csv (one row per
r x method x init x seed) and series.jsonl (each trajectory's cooperation at log-spaced times).
"""

import csv
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from apps.public_goods.fermi import FermiRandomSequential, FermiSynchronous
from apps.public_goods.model import GameConfig, LatticeSettings, PublicGoodsModel, check_r_and_method

SNAPSHOT_TIMES = (0, 1, 10, 100, 1000)
IMITATION = ("fermi", "fermi-sync")  # methods whose all-C / all-D states are absorbing


def build_dynamics(config: GameConfig):
    """The update rule named by `config.method` (validated by GameConfig)."""
    if config.method == "fermi":
        return FermiRandomSequential()
    if config.method == "fermi-sync":
        return FermiSynchronous()
    # torch is imported only by the learners: Fermi sweeps start 2 s faster per process without it
    from apps.public_goods.learners import build_learner

    return build_learner(config)


def make_model(config: GameConfig, seed: int) -> PublicGoodsModel:
    return PublicGoodsModel(config, build_dynamics(config), seed=seed)


def log_times(steps: int, points: int = 120) -> list[int]:
    """About `points` log-spaced step indices in [0, steps], 0 and `steps` included."""
    grid = np.unique(np.round(np.geomspace(1, steps + 1, points)).astype(int) - 1)
    return sorted(set(grid.tolist()) | {0, steps})


@dataclass
class Trajectory:
    cooperation: list[float]  # after each step, index 0 = the initial state
    snapshots: dict[int, np.ndarray]  # step -> (L, L) int8 lattice
    absorbed_at: int | None  # the step at which an imitation run reached all C or all D
    seconds: float

    def average(self, last: int) -> float:
        """Mean cooperation over the last `last` steps (an absorbed run stays at its absorbing value)."""
        return float(np.mean(self.cooperation[-last:]))

    def snapshot_records(self, r: float) -> list[dict]:
        """The dashboard's `snapshots` (docs/dashboards.md): {step, r, grid} per snapshot in step order,
        grid as lists of rows, 1 = cooperator, 0 = defector (an L = 100 lattice is 10k ints)."""
        return [{"step": t, "r": r, "grid": self.snapshots[t].tolist()} for t in sorted(self.snapshots)]


def simulate(config: GameConfig, seed: int, steps: int, on_step=None) -> Trajectory:
    """Run `steps` steps; an imitation run that reaches an absorbing state stops and is padded with it.
    `on_step(model)` is called after every step (logging, progress)."""
    model = make_model(config, seed)
    coop = [model.cooperation]
    snapshots = {0: model.strategy.copy()}
    absorbed_at = None
    start = time.perf_counter()
    for _ in range(steps):
        model.step()
        coop.append(model.cooperation)
        if model.steps in SNAPSHOT_TIMES:
            snapshots[model.steps] = model.strategy.copy()
        if on_step is not None:
            on_step(model)
        if config.method in IMITATION and model.absorbed:
            absorbed_at = model.steps
            coop.extend([coop[-1]] * (steps - model.steps))
            break
    return Trajectory(coop, snapshots, absorbed_at, time.perf_counter() - start)


# -------------------------------------------------------------------------------------------------
# Sweeps
# -------------------------------------------------------------------------------------------------


@dataclass
class SweepSettings(LatticeSettings):
    """The grid of a sweep plus the lattice settings shared by all of its runs."""

    r_values: tuple[float, ...] = field(
        default=(3.5, 4.0, 4.5, 5.0, 5.5), metadata={"help": "comma-separated r grid"}
    )
    methods: tuple[str, ...] = field(default=("fermi",), metadata={"help": "comma-separated methods"})
    inits: tuple[str, ...] = field(
        default=("bernoulli",), metadata={"help": "comma-separated initial states"}
    )
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "comma-separated seeds"})
    steps: int = field(default=2000, metadata={"help": "steps per run (MCS for Fermi, rounds for learners)"})
    average_last: int = field(default=1000, metadata={"help": "average cooperation over the last N steps"})
    workers: int = field(default=2, metadata={"help": "parallel processes"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r_values", "methods", "inits", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for r in self.r_values:
            for method in self.methods:
                check_r_and_method(r, method)
        for init in self.inits:
            LatticeSettings(**{**self.lattice_dict(), "init": init})
        if self.steps < 1 or not 1 <= self.average_last <= self.steps or self.workers < 1:
            raise ValueError("need steps >= 1, 1 <= average_last <= steps and workers >= 1")

    def lattice_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(LatticeSettings)}

    def jobs(self) -> list[tuple[GameConfig, int, int, int]]:
        """(game, seed, steps, average_last) for every point of the grid."""
        base = self.lattice_dict()
        return [
            (GameConfig(**{**base, "init": init}, r=r, method=method), seed, self.steps, self.average_last)
            for method in self.methods
            for init in self.inits
            for r in self.r_values
            for seed in self.seeds
        ]


RESULT_FIELDS = (
    "method",
    "init",
    "r",
    "seed",
    "final_cooperation",
    "mean_cooperation",
    "absorbed_at",
    "seconds",
)


def run_job(job: tuple[GameConfig, int, int, int]) -> tuple[dict, dict]:
    """One sweep point -> (a results row, its log-spaced cooperation series)."""
    config, seed, steps, average_last = job
    if config.method not in IMITATION:
        import torch  # one thread per worker: the workers are the parallelism

        torch.set_num_threads(1)
    traj = simulate(config, seed, steps)
    row = {
        "method": config.method,
        "init": config.init,
        "r": config.r,
        "seed": seed,
        "final_cooperation": traj.cooperation[-1],
        "mean_cooperation": traj.average(average_last),
        "absorbed_at": traj.absorbed_at if traj.absorbed_at is not None else "",
        "seconds": round(traj.seconds, 3),
    }
    times = log_times(steps)
    series = {**{k: row[k] for k in ("method", "init", "r", "seed")}, "t": times}
    series["cooperation"] = [traj.cooperation[t] for t in times]
    return row, series


def run_sweep(settings: SweepSettings, out_dir: Path, progress=print) -> list[dict]:
    """Run every grid point in `settings.workers` processes; write results.csv and series.jsonl."""
    jobs = settings.jobs()
    rows = []
    out_dir.mkdir(parents=True, exist_ok=True)
    with (
        ProcessPoolExecutor(max_workers=min(settings.workers, len(jobs))) as pool,
        open(out_dir / "series.jsonl", "w") as series_file,
    ):
        for done, (row, series) in enumerate(pool.map(run_job, jobs), start=1):
            rows.append(row)
            series_file.write(json.dumps(series) + "\n")
            series_file.flush()
            progress(
                f"[{done}/{len(jobs)}] {row['method']:>10} {row['init']:>12} r={row['r']:<5} seed={row['seed']} "
                f"cooperation {row['mean_cooperation']:.4f} ({row['seconds']:.1f} s)"
            )
    write_table(rows, out_dir / "results.csv")
    return rows


def write_table(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_table(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is this a sweep's run directory?")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("r", "final_cooperation", "mean_cooperation", "seconds"):
            row[key] = float(row[key])
        row["seed"] = int(row["seed"])
    return rows


def cooperation_vs_r(rows: list[dict]) -> list[dict]:
    """The dashboard's `cooperation_vs_r` of a sweep: mean over seeds of `mean_cooperation` (the average
    over the last steps, as in cooperation_vs_r.png) per method, initial state and r, labelled with the
    method, or "method (init)" when the sweep has several initial states.

    >>> rows = [{"method": "fermi", "init": "half", "r": 4.0, "mean_cooperation": c} for c in (0.25, 0.75)]
    >>> cooperation_vs_r(rows)
    [{'r': 4.0, 'cooperation': 0.5, 'label': 'fermi'}]
    """
    by_curve: dict[tuple[str, str, float], list[float]] = {}
    for row in rows:
        by_curve.setdefault((row["method"], row["init"], row["r"]), []).append(row["mean_cooperation"])
    several_inits = len({init for _, init, _ in by_curve}) > 1
    return [
        {
            "r": r,
            "cooperation": float(np.mean(values)),
            "label": f"{method} ({init})" if several_inits else method,
        }
        for (method, init, r), values in sorted(by_curve.items())
    ]


def thresholds(rows: list[dict], method: str = "fermi", init: str = "bernoulli") -> dict[str, list[float]]:
    """Brackets of the two extinction thresholds from final states: cooperators vanish below r_C,
    defectors vanish above r_D. Returns {"r_C": [largest r where C died in every seed, smallest r where
    C survived in every seed], "r_D": [largest r where D survived in every seed, smallest r where D died
    in every seed]}; math.nan where the grid does not reach."""
    by_r: dict[float, list[float]] = {}
    for row in rows:
        if row["method"] == method and row["init"] == init:
            by_r.setdefault(row["r"], []).append(row["final_cooperation"])
    rs = sorted(by_r)
    c_dead = [r for r in rs if all(c == 0.0 for c in by_r[r])]
    c_alive = [r for r in rs if all(c > 0.0 for c in by_r[r])]
    d_alive = [r for r in rs if all(c < 1.0 for c in by_r[r])]
    d_dead = [r for r in rs if all(c == 1.0 for c in by_r[r])]

    def first_above(values, bound):
        above = [v for v in values if v > bound]
        return min(above) if above else math.nan

    lo_c = max(c_dead) if c_dead else math.nan
    lo_d = max([r for r in d_alive if not d_dead or r < min(d_dead)], default=math.nan)
    return {
        "r_C": [lo_c, first_above(c_alive, lo_c if c_dead else -math.inf)],
        "r_D": [lo_d, first_above(d_dead, lo_d if not math.isnan(lo_d) else -math.inf)],
    }
