"""Experiments on the public goods game: one run, a sweep in parallel processes, and the threshold estimate.

    grpo-suite public-goods run --r 4.5 --method fermi --steps 1000      # live progress, run directory
    grpo-suite public-goods sweep --preset validation                    # Fermi thresholds, L = 100
    grpo-suite public-goods plot --run-dir runs/public_goods/<ts>        # figures into the run directory

A run directory holds config.json, metrics.jsonl (one line per logged step), snapshots.npz (the lattice at
t = 0, 1, 10, 100, 1000 when reached), eval.json and status.json; a sweep's holds results.csv (one row per
r x method x init x seed, with the time to cooperation), series.jsonl (each trajectory's cooperation at
log-spaced times) and summary.md (mean +- std over seeds per method, initial state and r).

Time to cooperation (our definition, docs/public_goods.md): the first step from which global cooperation
stays >= a threshold (`--coop-threshold`, 0.5: a majority of cooperators) until the end of the run; none if
the run ends below it. Step 0 is the initial lattice, so a half start that never drops below 0.5 scores 0.
"""

import csv
import ctypes
import io
import json
import math
import signal
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, fields, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from apps.public_goods.fermi import FermiRandomSequential, FermiSynchronous
from apps.public_goods.model import (
    GameConfig,
    LatticeSettings,
    PublicGoodsModel,
    check_positive,
    check_r_and_method,
)
from core.atomic import write_atomic

SNAPSHOT_TIMES = (0, 1, 10, 100, 1000)
COOP_THRESHOLD = 0.5  # time to cooperation: first step from which cooperation stays >= this
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
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


def time_to_cooperation(cooperation, threshold: float = COOP_THRESHOLD) -> int | None:
    """First step t (index into `cooperation`, 0 = the initial state) from which cooperation stays >=
    `threshold` until the end of the series; None if the last value is below it.

    >>> time_to_cooperation([0.0, 0.6, 0.4, 0.5, 0.9]), time_to_cooperation([0.7, 0.8]), time_to_cooperation([0.6, 0.4])
    (3, 0, None)
    """
    values = np.asarray(cooperation, dtype=float)  # (T + 1,)
    if values.size == 0:
        raise ValueError("time_to_cooperation needs a non-empty series")
    below = np.flatnonzero(values < threshold)
    if below.size == 0:
        return 0
    last_below = int(below[-1])
    return None if last_below == values.size - 1 else last_below + 1


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
    steps_run: int  # steps actually run: fewer than asked when the run was absorbed (one when from the start)

    def average(self, last: int) -> float:
        """Mean cooperation over the last `last` steps (an absorbed run stays at its absorbing value)."""
        return float(np.mean(self.cooperation[-last:]))

    def snapshot_records(self, r: float) -> list[dict]:
        """The dashboard's `snapshots` (docs/dashboards.md): {step, r, grid} per snapshot in step order,
        grid as lists of rows, 1 = cooperator, 0 = defector (an L = 100 lattice is 10k ints)."""
        return [{"step": t, "r": r, "grid": self.snapshots[t].tolist()} for t in sorted(self.snapshots)]


def simulate(
    config: GameConfig,
    seed: int,
    steps: int,
    on_step=None,
    *,
    start: tuple[PublicGoodsModel, Trajectory] | None = None,
    save=None,
    save_every: int = 0,
) -> Trajectory:
    """Run the game to step `steps`; an imitation run that reaches an absorbing state stops and is padded with it.
    `on_step(model)` is called after every step (logging, progress). `start`, a (model, trajectory so far)
    pair from `checkpoints.load_run`, continues a run from the step it reached. `save(model, trajectory)`,
    the trajectory unpadded, is called every `save_every` steps (0: never) and once at the end."""
    if start is None:
        model = make_model(config, seed)
        so_far = Trajectory([model.cooperation], {0: model.strategy.copy()}, None, 0.0, 0)
    else:
        model, so_far = start
    # False on a resume: a run absorbed from the start ends at step 1
    absorbed_from_start = config.method in IMITATION and model.absorbed
    began = time.perf_counter() - so_far.seconds
    while so_far.absorbed_at is None and model.steps < steps:
        model.step()
        so_far.cooperation.append(model.cooperation)
        if model.steps in SNAPSHOT_TIMES:
            so_far.snapshots[model.steps] = model.strategy.copy()
        so_far.steps_run = model.steps
        if on_step is not None:
            on_step(model)
        if config.method in IMITATION and model.absorbed:
            so_far.absorbed_at = 0 if absorbed_from_start else model.steps  # one step is still run and logged
        so_far.seconds = time.perf_counter() - began
        going = so_far.absorbed_at is None and model.steps < steps  # else the save after the loop
        if save is not None and save_every and model.steps % save_every == 0 and going:
            save(model, so_far)
    if save is not None:
        save(model, so_far)
    padding = [so_far.cooperation[-1]] * (steps + 1 - len(so_far.cooperation))
    return replace(so_far, cooperation=so_far.cooperation + padding)


# -------------------------------------------------------------------------------------------------
# Sweeps
# -------------------------------------------------------------------------------------------------


@dataclass
class SweepSettings(LatticeSettings):
    """The grid of a sweep plus the lattice settings shared by all of its runs."""

    init: str = field(  # LatticeSettings' field, which a sweep replaces by `inits`
        default=LatticeSettings.init,
        metadata={"help": "not used by a sweep: --inits gives its initial states"},
    )
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
    coop_threshold: float = field(
        default=COOP_THRESHOLD,
        metadata={"help": "time to cooperation: first step from which cooperation stays >= this"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r_values", "methods", "inits", "seeds"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name} must not be empty")
            if len(set(values)) != len(values):  # a repeated seed would count twice in the mean +- std
                raise ValueError(f"{name}: {', '.join(map(str, values))} repeats a value")
        if self.init != LatticeSettings.init:
            raise ValueError(f"init: a sweep takes its initial states from inits (--inits), got {self.init}")
        if min(self.seeds) < 0:
            raise ValueError(
                f"seeds must be >= 0 (numpy's generators take no negative seed), got {self.seeds}"
            )
        for r in self.r_values:
            for method in self.methods:
                check_r_and_method(r, method)
        for init in self.inits:
            LatticeSettings(**{**self.lattice_dict(), "init": init})
        if self.steps < 1 or not 1 <= self.average_last <= self.steps or self.workers < 1:
            raise ValueError(
                "need steps >= 1, 1 <= average_last <= steps and workers >= 1, got steps "
                f"{self.steps}, average_last {self.average_last}, workers {self.workers}"
            )
        if not 0.0 < self.coop_threshold <= 1.0:
            raise ValueError(f"coop_threshold must be in (0, 1], got {self.coop_threshold}")

    def lattice_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(LatticeSettings)}

    def jobs(self) -> list[tuple[GameConfig, int, int, int, float]]:
        """(game, seed, steps, average_last, coop_threshold) for every point of the grid."""
        base = self.lattice_dict()
        return [
            (
                GameConfig(**{**base, "init": init}, r=r, method=method),
                seed,
                self.steps,
                self.average_last,
                self.coop_threshold,
            )
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
    "time_to_cooperation",
    "absorbed_at",
    "seconds",
)


NUMBER_FIELDS = {
    "r": float,
    "seed": int,
    "final_cooperation": float,
    "mean_cooperation": float,
    "seconds": float,
}


def run_job(job: tuple[GameConfig, int, int, int, float]) -> tuple[dict, dict]:
    """One sweep point -> (a results row, its log-spaced cooperation series)."""
    config, seed, steps, average_last, coop_threshold = job
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
        "time_to_cooperation": _blank_none(time_to_cooperation(traj.cooperation, coop_threshold)),
        "absorbed_at": _blank_none(traj.absorbed_at),
        "seconds": round(traj.seconds, 3),
    }
    times = log_times(steps)
    series = {**{k: row[k] for k in ("method", "init", "r", "seed")}, "t": times}
    series["cooperation"] = [traj.cooperation[t] for t in times]
    return row, series


def _blank_none(value: int | None) -> int | str:
    return "" if value is None else value


def die_with_parent() -> None:
    """A sweep worker's initializer: the worker is killed when the sweep dies, by SIGKILL included (Linux's
    PR_SET_PDEATHSIG), which else left it waiting for jobs forever."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """The sweep's worker processes, spawned: each a child of the sweep, whatever the default start method
    (a forkserver's workers are its children, and it outlives a killed sweep), killed when it dies."""
    return ProcessPoolExecutor(workers, get_context("spawn"), initializer=die_with_parent)


def run_sweep(
    settings: SweepSettings,
    out_dir: Path,
    progress=print,
    finished: dict[int, tuple[dict, str]] | None = None,
) -> list[dict]:
    """Run every grid point in `settings.workers` processes; write results.csv and series.jsonl, both as
    each job finishes (in whatever order the jobs finish), so that a sweep stopped midway keeps (and `plot`
    shows) the jobs it finished. results.csv is in grid order throughout, series.jsonl once the sweep ends.
    `finished` (a resumed sweep's `finished_jobs`) are kept as they are and not run again."""
    jobs = settings.jobs()
    done: dict[int, tuple[dict, str]] = dict(finished or {})  # grid index -> (results row, series line)
    out_dir.mkdir(parents=True, exist_ok=True)
    pool = worker_pool(max(1, min(settings.workers, len(jobs) - len(done))))
    try:
        with open(out_dir / "series.jsonl", "w") as series_file:
            series_file.write("".join(done[index][1] for index in sorted(done)))
            series_file.flush()
            futures = {
                pool.submit(run_job, job): index for index, job in enumerate(jobs) if index not in done
            }
            for future in as_completed(futures):
                row, series = future.result()
                line = json.dumps(series) + "\n"
                done[futures[future]] = row, line
                series_file.write(line)
                series_file.flush()
                write_table([done[index][0] for index in sorted(done)], out_dir / "results.csv")
                progress(
                    f"[{len(done)}/{len(jobs)}] {row['method']:>10} {row['init']:>12} r={row['r']:<5} "
                    f"seed={row['seed']} cooperation {row['mean_cooperation']:.4f} ({row['seconds']:.1f} s)"
                )
    except BaseException:
        # a sweep stopped by an error, SIGTERM or Ctrl-C ends now, not after its running learner jobs, which
        # Python's exit handler would join: they are stopped (the executor has no public call for it; a
        # thread pool, as in the tests, has no processes)
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        raise
    finally:
        # no wait for the running jobs: the sweep is marked failed at once, when a supervisor may kill it
        pool.shutdown(wait=False, cancel_futures=True)
    rows = [done[index][0] for index in range(len(jobs))]
    write_atomic(out_dir / "series.jsonl", "".join(done[index][1] for index in range(len(jobs))).encode())
    write_atomic(out_dir / "summary.md", (summary_markdown(summarize(rows)) + "\n").encode())
    return rows


def finished_jobs(settings: SweepSettings, out_dir: Path) -> dict[int, tuple[dict, str]]:
    """The jobs a stopped sweep of `settings` finished in `out_dir`: grid index -> (results row, series line),
    for each job with both its row in results.csv and its line in series.jsonl (a job stopped between the
    two, or whose line was cut off, runs again). A damaged results.csv is an InputError naming its line."""
    index = {(game.method, game.init, game.r, seed): i for i, (game, seed, *_) in enumerate(settings.jobs())}
    table, series = out_dir / "results.csv", out_dir / "series.jsonl"
    lines = {}
    if series.is_file():
        for number, line in enumerate(series.read_text(encoding="utf-8").splitlines(keepends=True), 1):
            if not line.endswith("\n"):
                continue  # cut off by the kill
            try:
                record = json.loads(line)
                lines[(record["method"], record["init"], record["r"], record["seed"])] = line
            except (ValueError, KeyError, TypeError) as err:
                warnings.warn(
                    f"{series}:{number}: not a trajectory ({type(err).__name__}: {err}); its job runs again",
                    stacklevel=2,
                )
    rows = read_table(table) if table.is_file() else []
    if rows and "time_to_cooperation" not in table_header(table):
        # series.jsonl keeps log-spaced points only: the time cannot be rebuilt, and a blank reads "never"
        warnings.warn(
            f"{table} has no time_to_cooperation column (a sweep made before it existed): its "
            f"{len(rows)} finished jobs run again",
            stacklevel=2,
        )
        rows = []
    done = {}
    for row in rows:
        key = (row["method"], row["init"], row["r"], row["seed"])
        if key in index and key in lines:
            done[index[key]] = (row, lines[key])
    return done


def write_table(rows: list[dict], path: Path) -> None:
    """results.csv, whole or not at all: a kill mid-write leaves the previous file (or none)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=RESULT_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue().encode())


def table_header(path: Path) -> list[str]:
    """The column names of results.csv (its first non-empty line)."""
    from core.data import read_text

    return next((names for names in csv.reader(io.StringIO(read_text(path), newline="")) if names), [])


def read_table(path: Path) -> list[dict]:
    """The rows of results.csv, numbers parsed; a column missing from the header, a row cut short or a value
    that is not a number is an InputError naming the file, the line and the field."""
    from core.data import InputError, read_csv

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is this a sweep's run directory?")
    header = table_header(path)
    # every column but time_to_cooperation, which sweeps made before it existed lack
    missing = [name for name in RESULT_FIELDS if name not in header and name != "time_to_cooperation"]
    if missing:
        raise InputError(f"{path}:1: no {', '.join(missing)} column in the header")

    def parsed(line: int, row: dict, key: str, parse: type) -> int | float:
        value = row.get(key)
        if value is None:  # the last field, seconds, is missing from every row cut short
            raise InputError(f"{path}:{line}: no {key} field: the row is cut short")
        try:
            return parse(value)
        except ValueError as err:
            raise InputError(f"{path}:{line}: {key} {value!r} is not a valid {parse.__name__}") from err

    rows = []
    for line, row in read_csv(path):
        row.update({key: parsed(line, row, key, parse) for key, parse in NUMBER_FIELDS.items()})
        try:
            check_positive("r", row["r"])
        except ValueError as err:
            raise InputError(f"{path}:{line}: {err}") from err
        # blank: never reached (absorbed_at: no absorbing state); time_to_cooperation is absent from sweeps
        # made before the column existed
        for key in ("absorbed_at", "time_to_cooperation"):
            row[key] = parsed(line, row, key, int) if row.get(key) else ""
        rows.append(row)
    if rows and not path.read_bytes().endswith(b"\n"):  # write_table ends every row with a line end
        raise InputError(f"{path}:{line}: the last row has no line end: the file was cut off")
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); nan, nan for none."""
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(rows: list[dict]) -> list[dict]:
    """Per method, initial state and r, over seeds: mean and std of `mean_cooperation` (the average over the
    last steps) and of `time_to_cooperation` over the seeds that reached cooperation, and how many did.

    >>> rows = [{"method": "m", "init": "all_d", "r": 4.0, "mean_cooperation": c, "time_to_cooperation": t}
    ...         for c, t in ((0.8, 10), (0.6, 20), (0.2, ""))]
    >>> s = summarize(rows)[0]
    >>> (round(s["cooperation"], 3), s["time"], s["reached"], s["seeds"])
    (0.533, 15.0, 2, 3)
    """
    groups: dict[tuple[str, str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["init"], float(row["r"])), []).append(row)
    out = []
    for (method, init, r), group in sorted(groups.items()):
        coop_mean, coop_std = _mean_std([float(g["mean_cooperation"]) for g in group])
        times = [float(g["time_to_cooperation"]) for g in group if g["time_to_cooperation"] not in ("", None)]
        time_mean, time_std = _mean_std(times)
        out.append(
            {
                "method": method,
                "init": init,
                "r": r,
                "cooperation": coop_mean,
                "cooperation_std": coop_std,
                "time": time_mean,
                "time_std": time_std,
                "reached": len(times),
                "seeds": len(group),
            }
        )
    return out


def summary_markdown(summary: list[dict]) -> str:
    """The summary as a markdown table: cooperation (last steps) and time to cooperation, mean +- std (a
    value of one seed without a spread: it has none)."""
    lines = [
        "| method | init | r | cooperation (last steps) | time to cooperation | reached |",
        "|---|---|---|---|---|---|",
    ]

    def mean_std(mean: float, std: float, n: int, digits: int) -> str:
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")

    for s in summary:
        time = mean_std(s["time"], s["time_std"], s["reached"], 0) if s["reached"] else "never"
        cooperation = mean_std(s["cooperation"], s["cooperation_std"], s["seeds"], 2)
        lines.append(
            f"| {s['method']} | {s['init']} | {s['r']:g} | {cooperation} | {time} | {s['reached']}/{s['seeds']} |"
        )
    return "\n".join(lines)


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
    lo_d = (
        max(d_alive) if d_alive else math.nan
    )  # as r_C's: the last crossing, when the data are not monotone
    return {
        "r_C": [lo_c, first_above(c_alive, lo_c if c_dead else -math.inf)],
        "r_D": [lo_d, first_above(d_dead, lo_d if d_alive else -math.inf)],
    }
