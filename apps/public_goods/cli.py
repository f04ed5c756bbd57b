"""`grpo-suite public-goods run | sweep | plot`: the spatial public goods game from the command line.

grpo-suite public-goods run --r 4.5 --steps 1000                     # Fermi, L = 100, live progress
grpo-suite public-goods run --method grpo-gcc --init all_d --size 50 --steps 300
grpo-suite public-goods run --method grpo-gcc --init all_d --size 50 --steps 600 --resume --run-dir DIR  # on to 600
grpo-suite public-goods sweep --preset validation --run-dir runs/public_goods/validation
grpo-suite public-goods plot --run-dir runs/public_goods/validation
"""

import io
import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from apps.public_goods.experiments import (
    SweepSettings,
    cooperation_vs_r,
    finished_jobs,
    read_table,
    run_sweep,
    simulate,
    summarize,
    summary_markdown,
    thresholds,
    time_to_cooperation,
)
from apps.public_goods.model import GameConfig
from core.atomic import write_atomic
from core.cli import add_app, add_command
from core.config import config_to_dict
from core.data import InputError
from core.runs import (
    RunDir,
    changed_settings,
    default_run_dir,
    failure_recorded,
    is_run_dir,
    latest_config,
    refuse_another_kind_of_run,
    run_to_resume,
)

APP = "public_goods"


@dataclass
class RunConfig(GameConfig):
    """One game, one r, one method."""

    seed: int = field(default=0, metadata={"help": "seed of the model's generator (Model(seed=...))"})
    steps: int = field(default=1000, metadata={"help": "steps: Monte Carlo steps (Fermi) or learning rounds"})
    run_dir: str | None = field(
        default=None, metadata={"help": "run directory (default runs/public_goods/<ts>)"}
    )
    save_every: int = field(
        default=500, metadata={"help": "checkpoint every N steps (0: only at the end) for --resume"}
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest N checkpoints"})
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue the run in --run-dir from its newest checkpoint with its own settings, exactly as "
            "it would have gone on; only --steps (to go further), --save-every and --keep-checkpoints may change"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.save_every < 0:
            raise ValueError(
                f"save_every must be >= 0 (0: a checkpoint at the end only), got {self.save_every}"
            )
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy's generators take no negative seed), got {self.seed}")


@dataclass
class SweepConfig(SweepSettings):
    """A grid r x method x init x seed, run in parallel processes; results.csv in the run directory."""

    run_dir: str | None = field(
        default=None, metadata={"help": "run directory (default runs/public_goods/<ts>)"}
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue the sweep in --run-dir with its own settings: the jobs it finished are kept, the "
            "others run; only --workers may change"
        },
    )


@dataclass
class PlotConfig:
    """Figures of a run or sweep directory, written into it."""

    run_dir: str = field(default="", metadata={"help": "a run or sweep directory made by run / sweep"})

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("plot needs --run-dir, the directory of a run or a sweep")


RUN_PRESETS = {
    "smoke": {"size": 10, "steps": 5},
    "paper": {"size": 200, "steps": 10000},
}
# validation: the thresholds of Szolnoki, Perc & Szabo (2009), K = 0.5, L = 100 (docs/public_goods.md)
VALIDATION_R = (3.5, 3.64, 3.74, 3.84, 4.0, 4.25, 4.5, 4.75, 5.0, 5.25, 5.39, 5.49, 5.59, 5.75, 6.0)
DIRECTION = {
    "size": 50,
    "r_values": (3.0, 4.0, 5.0),
    "methods": ("fermi", "ppo", "grpo", "grpo-gcc"),
    "inits": ("all_d", "half"),
    "seeds": (0, 1, 2),
    "steps": 300,
    "average_last": 100,
}
SWEEP_PRESETS = {
    "smoke": {"size": 10, "steps": 5, "average_last": 2, "r_values": (3.0, 5.0), "seeds": (0, 1)},
    "validation": {
        "size": 100,
        "r_values": VALIDATION_R,
        "seeds": (0, 1),
        "steps": 15000,
        "average_last": 5000,
    },
    "learners": {
        "size": 20,
        "r_values": (3.0, 4.0, 5.0),
        "methods": ("ppo", "grpo", "grpo-gcc"),
        "inits": ("all_d", "half"),
        "seeds": (0, 1, 2),
        "steps": 150,
        "average_last": 50,
    },
    # the paper's direction at a larger lattice (docs/public_goods.md): learners and Fermi, all-D and half
    # starts; `direction-keep-switch` is the same with the keep/switch action, where the start matters
    "direction": DIRECTION,
    "direction-keep-switch": {**DIRECTION, "action": "keep_switch"},
}


# fields a resumed run may change: how far it goes and how it is saved, not what it computes
RUN_HOW_IT_RUNS = ("resume", "run_dir", "steps", "save_every", "keep_checkpoints")
# fields a resumed sweep may change: where and how it runs, not what it computes
SWEEP_HOW_IT_RUNS = ("resume", "run_dir", "workers")


def _resume_point(config: RunConfig):
    """(checkpoint, its step) of the run `--resume` continues, checked before anything is written: a
    public-goods run of this method with these settings, not beyond `--steps`; (None, 0) without one."""
    rundir = RunDir(_refuse_changed(config, config.method, RUN_HOW_IT_RUNS, "go on"))
    reached = rundir.newest_checkpoint_step() or 0
    if reached > config.steps:
        raise ValueError(
            f"{rundir.path}: the run has reached step {reached}; --steps {config.steps} would end before it"
        )
    return rundir.latest_checkpoint(), reached


def _refuse_changed(config: RunConfig | SweepConfig, algorithm: str, may_change: tuple, going: str) -> Path:
    """The directory `--resume` continues, which must hold a public-goods `algorithm` run (a method, or
    "sweep") with these settings but `may_change`; a field its config lacks (added since it ran, as
    coop_threshold) ran at its default. `going` says what the resume would do ("go on", "keep jobs run")."""
    what = "sweep" if algorithm == "sweep" else "run"
    path = run_to_resume(config.run_dir, what)
    stored = RunDir(path).read_config()
    refuse_another_kind_of_run(path, stored, APP, algorithm)
    ran_with = config_to_dict(type(config)()) | latest_config(stored)
    changed = changed_settings(ran_with, config_to_dict(config), may_change)
    if changed:
        raise ValueError(
            f"{path}: --resume would {going} with other settings ({'; '.join(changed)}); resume with the "
            f"{what}'s own settings, or pick a new --run-dir"
        )
    return path


def run(config: RunConfig) -> dict:
    import numpy as np

    from apps.public_goods.checkpoints import load_run, save_run

    game = GameConfig(**{f.name: getattr(config, f.name) for f in fields(GameConfig)})
    checkpoint, resumed_at = _resume_point(config) if config.resume else (None, 0)
    start = load_run(checkpoint, game, config.seed) if checkpoint else None  # read before anything is written
    path = Path(config.run_dir) if config.run_dir else default_run_dir(APP)
    rundir = RunDir.create(
        path, config_to_dict(config), app=APP, algorithm=config.method, exist_ok_for_resume=config.resume
    )
    print(f"run directory: {path}")
    if config.resume:
        # what a killed run logged after its checkpoint is logged again
        rundir.truncate_logs_after(resumed_at)
        print(
            f"resuming from step {resumed_at}"
            if checkpoint
            else "no checkpoint yet: starting again from step 0"
        )
    rundir.set_status("running", step=resumed_at)
    every = max(1, config.steps // 20)
    last_print = [time.perf_counter()]
    reached = [resumed_at]  # the step a failure is recorded at

    def on_step(model) -> None:
        reached[0] = model.steps
        rundir.log_metrics(
            model.steps,
            {"cooperation": model.cooperation, "mean_payoff": model.mean_payoff, **model.last_metrics},
        )
        now = time.perf_counter()
        if model.steps % every == 0 or now - last_print[0] > 5.0:
            last_print[0] = now
            print(
                f"step {model.steps:>7}  cooperation {model.cooperation:.4f}  payoff {model.mean_payoff:8.4f}"
            )

    def save(model, so_far) -> None:
        save_run(rundir, model, so_far, config.keep_checkpoints)
        rundir.set_status("running", step=model.steps)  # the step of its newest checkpoint, as the trainer's

    with failure_recorded(
        rundir, lambda: reached[0]
    ):  # SIGTERM, Ctrl-C included: a dead run is not "running"
        traj = simulate(
            game, config.seed, config.steps, on_step, start=start, save=save, save_every=config.save_every
        )
        snapshots = io.BytesIO()
        np.savez_compressed(snapshots, **{f"t{t}": s for t, s in traj.snapshots.items()})
        write_atomic(rundir.path / "snapshots.npz", snapshots.getvalue())
        summary = {
            "final_cooperation": traj.cooperation[-1],
            "mean_cooperation_last_half": traj.average(max(1, config.steps // 2)),
            "time_to_cooperation": time_to_cooperation(traj.cooperation),
            "absorbed_at": traj.absorbed_at,
            "seconds": traj.seconds,
            "steps_per_second": traj.steps_run / traj.seconds,
        }
        # the dashboard's fields (docs/dashboards.md): this run's point of the curve, and the lattices
        point = {"r": config.r, "cooperation": summary["mean_cooperation_last_half"], "label": config.method}
        rundir.write_eval(
            summary | {"cooperation_vs_r": [point], "snapshots": traj.snapshot_records(config.r)}
        )
    rundir.set_status("finished", step=traj.steps_run)
    for key, value in summary.items():
        print(f"{key:>28}  {value}")
    return summary


def sweep(config: SweepConfig) -> list[dict]:
    finished = {}
    if config.resume:  # checked and read before anything is written
        _refuse_changed(config, "sweep", SWEEP_HOW_IT_RUNS, "keep jobs run")
        finished = finished_jobs(config, Path(config.run_dir))
    path = Path(config.run_dir) if config.run_dir else default_run_dir(APP)
    rundir = RunDir.create(
        path, config_to_dict(config), app=APP, algorithm="sweep", exist_ok_for_resume=config.resume
    )
    print(f"run directory: {path}")
    if finished:
        print(f"resuming: {len(finished)} of {len(config.jobs())} jobs finished earlier are kept")
    rundir.set_status("running", step=len(finished))
    started = time.perf_counter()
    done = [len(finished)]  # jobs finished: the step a failure is recorded at

    def progress(line: str) -> None:
        done[0] += 1
        rundir.set_status("running", step=done[0])  # a sweep's step: the jobs it finished
        print(line)

    with failure_recorded(rundir, lambda: done[0]):  # SIGTERM and Ctrl-C too: a dead sweep is not "running"
        rows = run_sweep(config, rundir.path, progress=progress, finished=finished)
        found = {method: thresholds(rows, method, config.inits[0]) for method in config.methods}
        rundir.write_eval(
            {
                "seconds": time.perf_counter() - started,
                "thresholds": found,
                "runs": len(rows),
                "cooperation_vs_r": cooperation_vs_r(rows),
                "summary": summarize(rows),
            }
        )
    rundir.set_status("finished", step=len(rows))
    print(summary_markdown(summarize(rows)))
    print(f"results: {rundir.path / 'results.csv'}  ({time.perf_counter() - started:.0f} s)")
    as_stored = {  # as eval.json holds them: null where the grid does not reach
        method: {name: [None if math.isnan(r) else r for r in pair] for name, pair in by_name.items()}
        for method, by_name in found.items()
    }
    print(f"thresholds from final states ({config.inits[0]} start): {json.dumps(as_stored)}")
    return rows


def plot(config: PlotConfig) -> list[Path]:
    from apps.public_goods.plots import plot_run, plot_sweep

    path = Path(config.run_dir)
    rundir = RunDir(path)
    if is_run_dir(path) and (app := rundir.read_config()["app"]) != APP:
        raise InputError(f"{path}: a {app!r} run, not a public-goods run or sweep; nothing to plot")
    if (path / "results.csv").is_file():
        written = plot_sweep(read_table(path / "results.csv"), path)
    elif rundir.metrics_path.is_file():
        written = plot_run(rundir.read_metrics(), path / "snapshots.npz", path)
    else:
        raise FileNotFoundError(f"{path} has neither results.csv (a sweep) nor metrics.jsonl (a run) to plot")
    for p in written:
        print(f"wrote {p}")
    return written


def register(apps) -> None:
    verbs = add_app(
        apps, "public-goods", "spatial public goods game: Fermi baselines, Q-learning, PPO, GRPO-GCC"
    )
    add_command(verbs, "run", RunConfig, run, "one game: one r, one method, live progress", RUN_PRESETS)
    add_command(verbs, "sweep", SweepConfig, sweep, "r x methods x inits x seeds in parallel", SWEEP_PRESETS)
    add_command(verbs, "plot", PlotConfig, plot, "figures of a run or sweep directory")
