"""`grpo-suite public-goods run | sweep | plot` smoke runs and configuration errors; a run that fails is
marked failed, and its result files are written whole or not at all."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from apps.public_goods import cli, experiments
from apps.public_goods.experiments import Trajectory, thresholds
from apps.public_goods.model import GameConfig
from core.cli import main
from core.runs import RunDir


@pytest.mark.parametrize("method", ["fermi", "grpo-gcc"])  # every method: test_pgg_learners.py
def test_run_smoke(tmp_path, capsys, method):
    run_dir = tmp_path / method
    assert (
        main(["public-goods", "run", "--preset", "smoke", "--method", method, "--run-dir", str(run_dir)]) == 0
    )
    assert f"run directory: {run_dir}" in capsys.readouterr().out
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) <= 5 and json.loads(lines[0])["step"] == 1
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    result = json.loads((run_dir / "eval.json").read_text())
    assert 0.0 <= result["final_cooperation"] <= 1.0 and "time_to_cooperation" in result
    assert (
        result["final_cooperation"] == json.loads(lines[-1])["cooperation"]
    )  # the last step's, not the first
    if method == "grpo-gcc":
        assert main(["public-goods", "plot", "--run-dir", str(run_dir)]) == 0
        assert (run_dir / "cooperation.png").is_file() and (run_dir / "snapshots.png").is_file()


def test_a_run_absorbed_from_the_start_reports_the_one_step_it_ran(tmp_path):
    run_dir = tmp_path / "all_d"
    args = [
        "--method",
        "fermi",
        "--init",
        "all_d",
        "--size",
        "6",
        "--steps",
        "1000",
        "--run-dir",
        str(run_dir),
    ]
    assert main(["public-goods", "run", *args]) == 0
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((run_dir / "status.json").read_text())["step"] == 1  # was 1000
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["absorbed_at"] == 0
    assert result["steps_per_second"] == pytest.approx(1 / result["seconds"], rel=1e-3)


def test_sweep_and_plot_smoke(tmp_path, capsys):
    run_dir = tmp_path / "sweep"
    args = ["public-goods", "sweep", "--preset", "smoke", "--methods", "fermi,grpo", "--workers", "1"]
    assert main([*args, "--run-dir", str(run_dir)]) == 0
    # the printed thresholds are eval.json's (null, not NaN, where the grid does not reach)
    printed = capsys.readouterr().out.split("thresholds from final states (bernoulli start): ")[1]
    assert json.loads(printed) == json.loads((run_dir / "eval.json").read_text())["thresholds"]
    with open(run_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 and {r["method"] for r in rows} == {"fermi", "grpo"}
    assert all(r["time_to_cooperation"] == "" or 0 <= int(r["time_to_cooperation"]) <= 5 for r in rows)
    summary = (run_dir / "summary.md").read_text().splitlines()
    assert summary[0].startswith("| method | init | r |") and len(summary) == 2 + 2 * 2  # method x r
    assert len(json.loads((run_dir / "eval.json").read_text())["summary"]) == 4
    assert len((run_dir / "series.jsonl").read_text().splitlines()) == 8
    assert main(["public-goods", "plot", "--run-dir", str(run_dir)]) == 0
    assert (run_dir / "cooperation_vs_r.png").is_file() and (run_dir / "cooperation_over_time.png").is_file()


def test_thresholds_bracket():
    rows = [
        {"method": "fermi", "init": "bernoulli", "r": r, "final_cooperation": c}
        for r, c in [(3.6, 0.0), (3.7, 0.0), (3.7, 0.01), (3.8, 0.3), (5.4, 0.99), (5.5, 1.0), (5.6, 1.0)]
    ]
    assert thresholds(rows) == {"r_C": [3.6, 3.8], "r_D": [5.4, 5.5]}
    # not monotone in r: both brackets hold the last crossing, as the docstring says (r_D had the first)
    noisy = [(3.5, 0.0), (3.6, 0.2), (3.7, 0.0), (3.8, 0.2), (5.3, 0.9), (5.4, 1.0), (5.5, 0.9), (5.6, 1.0)]
    rows = [{"method": "fermi", "init": "bernoulli", "r": r, "final_cooperation": c} for r, c in noisy]
    assert thresholds(rows) == {"r_C": [3.7, 3.8], "r_D": [5.5, 5.6]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--size", "2"], "size \\(L\\) must be an integer >= 3"),
        (["run", "--r", "0"], "r must be > 0"),
        (["run", "--method", "sarsa"], "'sarsa' is not one of"),
        (["sweep", "--methods", "fermi,sarsa"], "unknown method 'sarsa'"),
        (["sweep", "--r-values", "4,-1"], "r must be > 0"),
        (["plot"], "plot needs --run-dir"),
        (["run", "--seed", "-1"], "seed must be >= 0"),
        (["sweep", "--seeds", "0,-2"], "seeds must be >= 0"),
        (["sweep", "--seeds", "0,0"], "seeds: 0, 0 repeats a value"),
        (["sweep", "--r-values", "3,3"], "r_values: 3.0, 3.0 repeats a value"),
        (
            ["sweep", "--init", "half"],
            r"init: a sweep takes its initial states from inits \(--inits\), got half",
        ),
        (["sweep", "--steps", "500"], "got steps 500, average_last 1000"),
        (["run", "--method", "ppo", "--clip-eps", "1.5"], "clip_eps must be in \\(0, 1\\)"),
        (["run", "--keep-checkpoints", "0"], "keep_checkpoints must be >= 1, got 0"),
        (["run", "--save-every", "-1"], "save_every must be >= 0 \\(0: a checkpoint at the end only\\)"),
        (["run", "--steps", "0"], "steps must be >= 1, got 0"),
    ],
)
def test_bad_configuration_is_a_clear_error(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["public-goods", *args])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_plot_of_a_run_with_nothing_logged_says_so(tmp_path, capsys):
    RunDir.create(tmp_path / "empty", {}, app=cli.APP, algorithm="fermi", exist_ok_for_resume=False)
    with pytest.raises(SystemExit):
        main(["public-goods", "plot", "--run-dir", str(tmp_path / "empty")])
    assert "has neither results.csv (a sweep) nor metrics.jsonl (a run) to plot" in capsys.readouterr().err


def test_plot_of_another_apps_run_says_so(tmp_path, capsys):
    """It said "[Errno 2] No such file or directory: '<run>/snapshots.npz'"."""
    run = RunDir.create(tmp_path / "rm", {}, app="reward_model", algorithm="bt", exist_ok_for_resume=False)
    run.log_metrics(1, {"loss": 0.5})
    with pytest.raises(SystemExit) as exit_info:
        main(["public-goods", "plot", "--run-dir", str(run.path)])
    message = f"error: {run.path}: a 'reward_model' run, not a public-goods run or sweep; nothing to plot"
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("verb", "work"), [("run", "simulate"), ("sweep", "run_sweep")])
@pytest.mark.parametrize("error", [RuntimeError("out of memory"), KeyboardInterrupt()])
def test_a_run_or_sweep_that_dies_is_marked_failed(tmp_path, monkeypatch, capsys, verb, work, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli, work, fail)
    # Ctrl-C ends the command with a line (exit 130), not a traceback
    with pytest.raises(SystemExit if isinstance(error, KeyboardInterrupt) else type(error)) as raised:
        main(["public-goods", verb, "--preset", "smoke", "--run-dir", str(tmp_path / verb)])
    if isinstance(error, KeyboardInterrupt):
        assert raised.value.code == 130
        assert capsys.readouterr().err.endswith(
            f"public-goods {verb}: interrupted; a run it was writing is marked failed (`--resume --run-dir DIR` "
            "continues it, where the command has that flag); stopped before its run began, the same command "
            "with the same --run-dir starts it again, reusing a base model it had built\n"
        )
    status = RunDir(tmp_path / verb).read_status()
    assert (status["status"], status["error"]) == ("failed", f"{type(error).__name__}: {error}")


def test_ctrl_c_is_said_once_under_a_launch(tmp_path, monkeypatch, capsys):
    """Every process of a launch gets the Ctrl-C: process 0 alone prints the line, the others exit 130."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "simulate", interrupted)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # main sends a non-zero rank's stdout to devnull
    with pytest.raises(SystemExit) as raised:
        main(["public-goods", "run", "--preset", "smoke", "--run-dir", str(tmp_path / "run")])
    assert raised.value.code == 130 and "interrupted" not in capsys.readouterr().err


def test_a_run_that_dies_midway_records_the_step_it_reached(tmp_path, monkeypatch):
    def seven_steps_then_fail(game, seed, steps, on_step, **resume_and_saves):
        for step in range(1, 8):
            on_step(SimpleNamespace(steps=step, cooperation=0.5, mean_payoff=1.0, last_metrics={}))
        raise RuntimeError("killed")

    monkeypatch.setattr(cli, "simulate", seven_steps_then_fail)
    with pytest.raises(RuntimeError):
        main(["public-goods", "run", "--preset", "smoke", "--run-dir", str(tmp_path / "run")])
    status = RunDir(tmp_path / "run").read_status()
    assert (status["status"], status["step"]) == ("failed", 7)


def test_a_failed_sweep_is_marked_failed_without_waiting_for_its_running_jobs(tmp_path, monkeypatch):
    running, release, finished = threading.Event(), threading.Event(), []

    def run_job(job):  # seed 0 fails once seed 1 is running; seed 1 runs until released
        if job[1] == 0:
            running.wait(timeout=10)
            raise RuntimeError("out of memory")
        running.set()
        release.wait(timeout=10)
        finished.append(job)

    monkeypatch.setattr(experiments, "run_job", run_job)
    monkeypatch.setattr(experiments, "worker_pool", ThreadPoolExecutor)
    args = ["--preset", "smoke", "--r-values", "4", "--workers", "2", "--run-dir", str(tmp_path / "sweep")]
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["public-goods", "sweep", *args])
    assert not finished and RunDir(tmp_path / "sweep").read_status()["status"] == "failed"
    release.set()


class _Unconvertible:
    def __array__(self, *args, **kwargs):
        raise RuntimeError("cannot convert")


def test_snapshots_that_fail_midway_leave_no_part_of_the_archive(tmp_path, monkeypatch):
    # t0 is serialized, then t1 fails: np.savez into the file itself left an archive holding t0 only
    trajectory = Trajectory([0.5], {0: np.zeros((3, 3), np.int8), 1: _Unconvertible()}, None, 1.0, 1)
    monkeypatch.setattr(cli, "simulate", lambda *args, **kwargs: trajectory)
    with pytest.raises(RuntimeError, match="cannot convert"):
        main(["public-goods", "run", "--preset", "smoke", "--run-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "snapshots.npz").exists()


def test_a_results_table_that_fails_midway_leaves_the_previous_one(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("old\n")
    row = dict.fromkeys(experiments.RESULT_FIELDS, 0)
    with pytest.raises(ValueError, match="fields not in fieldnames"):  # the second row fails to serialize
        experiments.write_table([row, {**row, "extra": 1}], path)
    assert path.read_text() == "old\n"


def test_a_summary_that_fails_midway_leaves_the_previous_one(tmp_path, monkeypatch):
    (tmp_path / "summary.md").write_text("old\n")
    # a lone surrogate cannot be encoded: writing the file directly failed after truncating it
    monkeypatch.setattr(experiments, "summary_markdown", lambda summary: "| new \ud800 |")
    monkeypatch.setattr(experiments, "worker_pool", ThreadPoolExecutor)  # no 4 s process start
    settings = cli.SweepConfig(size=5, steps=2, average_last=1, r_values=(4.0,), workers=1)
    with pytest.raises(UnicodeEncodeError):
        experiments.run_sweep(settings, tmp_path, progress=lambda line: None)
    assert (tmp_path / "summary.md").read_text() == "old\n"


def test_a_sweep_stopped_midway_keeps_the_jobs_it_finished(tmp_path, monkeypatch):
    """results.csv is written as each job ends: a killed sweep had none, and `plot` refused its directory."""
    real_run_job = experiments.run_job

    def run_job(job):
        if job[0].r == 5.0:  # the second grid point: stopped there
            raise KeyboardInterrupt
        return real_run_job(job)

    monkeypatch.setattr(experiments, "run_job", run_job)
    monkeypatch.setattr(experiments, "worker_pool", ThreadPoolExecutor)  # no 4 s process start
    args = ["--size", "5", "--steps", "4", "--average-last", "2", "--r-values", "4,5", "--workers", "1"]
    with pytest.raises(SystemExit):  # Ctrl-C
        main(
            [
                "public-goods",
                "sweep",
                *args,
                "--methods",
                "fermi",
                "--seeds",
                "0",
                "--run-dir",
                str(tmp_path / "s"),
            ]
        )
    rows = experiments.read_table(tmp_path / "s" / "results.csv")
    assert [row["r"] for row in rows] == [4.0]
    assert main(["public-goods", "plot", "--run-dir", str(tmp_path / "s")]) == 0


def _sweep_behind_a_slow_first_job(tmp_path, monkeypatch, then):
    """A sweep r = 4, 5, 6 in 2 threads whose first job waits until the other two are written, then calls
    `then(job)`; returns the rows run_sweep returned."""
    real_run_job, written = experiments.run_job, threading.Event()

    def run_job(job):
        if job[0].r == 4.0:
            written.wait(timeout=5)
            return then(job)
        return real_run_job(job)

    def progress(line):
        if line.startswith("[2/3]"):
            written.set()

    monkeypatch.setattr(experiments, "run_job", run_job)
    monkeypatch.setattr(experiments, "worker_pool", ThreadPoolExecutor)  # no 4 s process start
    settings = experiments.SweepSettings(size=5, steps=4, average_last=2, r_values=(4.0, 5.0, 6.0), workers=2)
    return experiments.run_sweep(settings, tmp_path, progress=progress)


def _series_rs(path):
    return [json.loads(line)["r"] for line in path.read_text().splitlines()]


def test_a_sweep_stopped_behind_a_slow_first_job_keeps_the_jobs_that_finished_after_it(tmp_path, monkeypatch):
    def stopped(job):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _sweep_behind_a_slow_first_job(tmp_path, monkeypatch, stopped)
    assert [row["r"] for row in experiments.read_table(tmp_path / "results.csv")] == [5.0, 6.0]
    assert _series_rs(tmp_path / "series.jsonl") == [5.0, 6.0]


def test_a_sweep_whose_jobs_finish_out_of_order_writes_its_files_in_grid_order(tmp_path, monkeypatch):
    rows = _sweep_behind_a_slow_first_job(tmp_path, monkeypatch, experiments.run_job)
    assert [row["r"] for row in rows] == [4.0, 5.0, 6.0]
    assert [row["r"] for row in experiments.read_table(tmp_path / "results.csv")] == [4.0, 5.0, 6.0]
    assert _series_rs(tmp_path / "series.jsonl") == [4.0, 5.0, 6.0]


REAL_RUN_JOB = experiments.run_job  # not a patched one of an earlier call in the same test
SWEEP_GRID = ["--size", "5", "--steps", "4", "--average-last", "2", "--r-values", "4,5,6", "--workers", "1"]


def _counted_sweep(monkeypatch, stop_at: float | None = None) -> list[float]:
    """Jobs run in threads, each r recorded; the job at r = `stop_at` raises KeyboardInterrupt."""
    real_run_job, ran = REAL_RUN_JOB, []

    def run_job(job):
        if job[0].r == stop_at:
            raise KeyboardInterrupt
        ran.append(job[0].r)
        return real_run_job(job)

    monkeypatch.setattr(experiments, "run_job", run_job)
    monkeypatch.setattr(experiments, "worker_pool", ThreadPoolExecutor)  # no 4 s process start
    return ran


def _without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_a_resumed_sweep_runs_only_the_jobs_it_had_not_finished(tmp_path, monkeypatch, capsys):
    _counted_sweep(monkeypatch)
    assert main(["public-goods", "sweep", *SWEEP_GRID, "--run-dir", str(tmp_path / "straight")]) == 0
    stopped = tmp_path / "stopped"
    _counted_sweep(monkeypatch, stop_at=5.0)
    with pytest.raises(SystemExit):  # Ctrl-C
        main(["public-goods", "sweep", *SWEEP_GRID, "--run-dir", str(stopped)])
    kept = experiments.read_table(stopped / "results.csv")
    assert [row["r"] for row in kept] == [4.0]
    status = json.loads((stopped / "status.json").read_text())
    assert (status["status"], status["step"]) == ("failed", 1)  # the jobs it finished
    # a job whose series line was cut off by the kill runs again; a line that is no trajectory is named
    (stopped / "series.jsonl").write_text(
        "[1, 2]\n" + (stopped / "series.jsonl").read_text() + '{"method": "fer'
    )

    ran = _counted_sweep(monkeypatch)
    capsys.readouterr()
    with pytest.warns(
        UserWarning, match=r"series.jsonl:1: not a trajectory \(TypeError: .*its job runs again"
    ):
        assert main(["public-goods", "sweep", "--resume", "--run-dir", str(stopped), "--workers", "2"]) == 0
    assert sorted(ran) == [5.0, 6.0]  # r = 4 was kept, with the settings of the sweep's config.json
    assert "resuming: 1 of 3 jobs finished earlier are kept" in capsys.readouterr().out
    rows = experiments.read_table(stopped / "results.csv")
    assert rows[0] == kept[0]  # as it was, its seconds included
    assert _without_seconds(rows) == _without_seconds(
        experiments.read_table(tmp_path / "straight" / "results.csv")
    )
    assert (stopped / "series.jsonl").read_text() == (tmp_path / "straight" / "series.jsonl").read_text()
    result, straight = (json.loads((d / "eval.json").read_text()) for d in (stopped, tmp_path / "straight"))
    assert {k: v for k, v in result.items() if k != "seconds"} == {
        k: v for k, v in straight.items() if k != "seconds"
    }
    assert json.loads((stopped / "status.json").read_text())["status"] == "finished"
    # resumed again when finished: nothing runs, the files stay
    ran.clear()
    assert main(["public-goods", "sweep", "--resume", "--run-dir", str(stopped)]) == 0
    assert ran == [] and _without_seconds(
        experiments.read_table(stopped / "results.csv")
    ) == _without_seconds(rows)


def test_a_sweep_made_before_the_time_to_cooperation_column_runs_its_jobs_again(
    tmp_path, monkeypatch, capsys
):
    """Its rows were kept with a blank time, which reads "never reached": the summary said 0/2 reached."""
    _counted_sweep(monkeypatch)
    run = tmp_path / "old"
    assert main(["public-goods", "sweep", *SWEEP_GRID, "--run-dir", str(run)]) == 0
    straight = experiments.read_table(run / "results.csv")
    with (run / "results.csv").open() as f:  # as a sweep made before the column wrote it
        table = list(csv.DictReader(f))
    with (run / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, [k for k in table[0] if k != "time_to_cooperation"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    ran = _counted_sweep(monkeypatch)
    with pytest.warns(
        UserWarning, match="has no time_to_cooperation column .*: its 3 finished jobs run again"
    ):
        assert main(["public-goods", "sweep", "--resume", "--run-dir", str(run)]) == 0
    assert sorted(ran) == [4.0, 5.0, 6.0]
    assert _without_seconds(experiments.read_table(run / "results.csv")) == _without_seconds(straight)


def test_a_sweep_resume_with_other_settings_or_nothing_to_resume_is_refused(tmp_path, monkeypatch, capsys):
    _counted_sweep(monkeypatch)
    sweep = tmp_path / "s"
    assert main(["public-goods", "sweep", *SWEEP_GRID, "--run-dir", str(sweep)]) == 0
    config = (sweep / "config.json").read_text()
    for flags, message in [
        (["--steps", "6"], f"{sweep}: --resume would keep jobs run with other settings (steps 4 -> 6)"),
        ([], None),  # the run's own settings: accepted
    ]:
        code = None
        try:
            code = main(["public-goods", "sweep", "--resume", "--run-dir", str(sweep), *flags])
        except SystemExit as exit_info:
            code = exit_info.code
        if message:
            assert code == 2 and message in capsys.readouterr().err
            assert (sweep / "config.json").read_text() == config  # refused before anything is written
        else:
            assert code == 0
    # a sweep made before a field existed (its config.json lacks coop_threshold) resumes at the default
    stored = json.loads(config)
    del stored["config"]["coop_threshold"]
    (sweep / "config.json").write_text(json.dumps(stored))
    assert main(["public-goods", "sweep", "--resume", "--run-dir", str(sweep)]) == 0
    with pytest.raises(SystemExit):
        main(["public-goods", "sweep", "--resume", "--run-dir", str(tmp_path / "none")])
    assert "holds no sweep to continue" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["public-goods", "run", "--preset", "smoke", "--run-dir", str(run)]) == 0
    with pytest.raises(SystemExit):
        main(["public-goods", "sweep", "--resume", "--run-dir", str(run)])
    assert (
        f"(with the settings of {run}, a 'public_goods' 'fermi' run: resume a run with the command that made it)"
        in capsys.readouterr().err
    )


def test_simulate_pads_an_absorbed_run_with_its_absorbing_state():
    """An imitation run that reaches all C at step t stops there and is padded to steps + 1 values, those up
    to t being the model's stepped by hand; a run absorbed from the start runs (and reports) one step."""
    config = GameConfig(size=4, r=10.0, init="half", noise_k=0.1)
    traj = experiments.simulate(config, seed=0, steps=30)
    model = experiments.make_model(config, seed=0)
    by_hand = [model.cooperation]
    while not model.absorbed:
        model.step()
        by_hand.append(model.cooperation)
    assert by_hand == [0.5, 0.75, 0.9375, 1.0]  # all C after 3 steps
    assert traj.cooperation == by_hand + [1.0] * 27 and len(traj.cooperation) == 31
    assert (traj.absorbed_at, traj.steps_run, sorted(traj.snapshots)) == (3, 3, [0, 1])
    start = experiments.simulate(GameConfig(size=4, init="all_d"), seed=0, steps=6)
    assert start.cooperation == [0.0] * 7 and (start.absorbed_at, start.steps_run) == (0, 1)


def test_a_sweep_row_and_series_come_from_the_trajectory():
    """run_job's row for (fermi-sync, half, r = 4, seed 0, 6 steps, average over the last 3, threshold 0.5),
    against the trajectory of `simulate`: cooperation 0.4, 0.68, 0.68, 0.64, 0.68, 0.68, 0.72."""
    config = GameConfig(size=5, r=4.0, method="fermi-sync", init="half")
    row, series = experiments.run_job((config, 0, 6, 3, 0.5))
    cooperation = experiments.simulate(config, 0, 6).cooperation
    assert cooperation == pytest.approx([0.4, 0.68, 0.68, 0.64, 0.68, 0.68, 0.72])
    assert (row["method"], row["init"], row["r"], row["seed"]) == ("fermi-sync", "half", 4.0, 0)
    assert row["final_cooperation"] == pytest.approx(0.72)
    assert row["mean_cooperation"] == pytest.approx((0.68 + 0.68 + 0.72) / 3)  # not the mean of all 7
    assert (row["time_to_cooperation"], row["absorbed_at"]) == (1, "")
    assert set(row) == set(experiments.RESULT_FIELDS)
    assert series["t"] == list(range(7)) and series["cooperation"] == cooperation
    keys = ("method", "init", "r", "seed")
    assert [series[k] for k in keys] == [row[k] for k in keys]


def test_a_resumed_sweep_keeps_only_jobs_with_both_their_row_and_their_series_line(tmp_path):
    """A job killed between writing its results.csv row and its series.jsonl line runs again."""
    settings = experiments.SweepSettings(size=5, steps=4, average_last=2, r_values=(4.0, 5.0, 6.0), workers=1)
    rows, lines = [], []
    for r in settings.r_values:
        key = {"method": "fermi", "init": "bernoulli", "r": r, "seed": 0}
        rows.append(
            {**key, "final_cooperation": 0.5, "mean_cooperation": 0.45, "time_to_cooperation": 3,
             "absorbed_at": "", "seconds": 0.1}
        )  # fmt: skip
        lines.append(json.dumps({**key, "t": [0, 4], "cooperation": [0.4, 0.5]}) + "\n")
    experiments.write_table(rows, tmp_path / "results.csv")
    (tmp_path / "series.jsonl").write_text(lines[0] + lines[2])  # r = 5's line is missing
    done = experiments.finished_jobs(settings, tmp_path)
    assert sorted(done) == [0, 2]
    assert done[0] == (rows[0], lines[0]) and done[2] == (rows[2], lines[2])


def test_a_sweep_may_average_over_all_its_steps():
    assert experiments.SweepSettings(steps=4, average_last=4).jobs()[0][2:4] == (4, 4)
    with pytest.raises(ValueError, match="got steps 4, average_last 5"):
        experiments.SweepSettings(steps=4, average_last=5)


def test_a_sweep_row_takes_the_time_to_cooperation_at_its_own_threshold():
    """The trajectory of test_a_sweep_row_and_series_come_from_the_trajectory ends 0.68, 0.68, 0.72: at
    threshold 0.7 cooperation is reached at the last step, 6 (at 0.5 it is 1)."""
    config = GameConfig(size=5, r=4.0, method="fermi-sync", init="half")
    row, _ = experiments.run_job((config, 0, 6, 3, 0.7))
    assert row["time_to_cooperation"] == 6


def test_a_sweeps_grid_runs_method_then_init_then_r_then_seed():
    settings = experiments.SweepSettings(
        size=5, steps=2, average_last=1, r_values=(4.0, 5.0), methods=("fermi", "grpo"),
        inits=("all_d", "half"), seeds=(0, 1),
    )  # fmt: skip
    grid = [(game.method, game.init, game.r, seed) for game, seed, *_ in settings.jobs()]
    assert grid == [
        (method, init, r, seed)
        for method in ("fermi", "grpo")
        for init in ("all_d", "half")
        for r in (4.0, 5.0)
        for seed in (0, 1)
    ]


def test_a_sweeps_thresholds_are_those_of_its_first_initial_state(tmp_path, monkeypatch, capsys):
    """All-D Fermi runs stay all D: C died at every r, so r_C's lower end is the largest r, 5; the half
    starts keep cooperators and bracket nothing there."""
    _counted_sweep(monkeypatch)
    args = ["--size", "5", "--steps", "2", "--average-last", "1", "--r-values", "4,5", "--workers", "1"]
    assert main(["public-goods", "sweep", *args, "--inits", "all_d,half", "--run-dir", str(tmp_path)]) == 0
    rows = experiments.read_table(tmp_path / "results.csv")
    assert [row["final_cooperation"] > 0.0 for row in rows] == [False, False, True, True]
    found = json.loads((tmp_path / "eval.json").read_text())["thresholds"]["fermi"]
    assert found["r_C"] == [5.0, None] and found["r_D"] == [5.0, None]
    assert (
        'thresholds from final states (all_d start): {"fermi": {"r_C": [5.0, null]' in capsys.readouterr().out
    )


def test_a_resumed_sweep_is_running_from_the_jobs_it_kept(tmp_path, monkeypatch):
    _counted_sweep(monkeypatch)
    sweep = tmp_path / "s"
    assert main(["public-goods", "sweep", *SWEEP_GRID, "--run-dir", str(sweep)]) == 0
    seen = []

    def dies_at_once(*args, **kwargs):
        seen.append(RunDir(sweep).read_status())
        raise RuntimeError("killed")

    monkeypatch.setattr(cli, "run_sweep", dies_at_once)
    with pytest.raises(RuntimeError, match="killed"):
        main(["public-goods", "sweep", "--resume", "--run-dir", str(sweep)])
    assert [(status["status"], status["step"]) for status in seen] == [("running", 3)]
    status = RunDir(sweep).read_status()
    assert (status["status"], status["step"]) == ("failed", 3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])  # forkserver: Python 3.14's default
def test_the_workers_of_a_sweep_killed_with_sigkill_end_with_it(tmp_path, start_method):
    """kill -9 of a sweep left its worker processes waiting for jobs forever. Under a forkserver (set as the
    default here) a worker's parent is that server, which outlives the sweep: the sweep spawns its own."""
    script = tmp_path / "sweep.py"  # a file: the workers import it to find `sleeper`
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        "from pathlib import Path\n"
        "from apps.public_goods import experiments\n"
        "def sleeper(job):\n"
        "    print(os.getpid(), flush=True)\n"
        "    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        f"    multiprocessing.set_start_method({start_method!r}, force=True)\n"
        "    experiments.run_job = sleeper\n"
        "    settings = experiments.SweepSettings(size=5, steps=4, average_last=2, r_values=(4.0, 5.0), workers=2)\n"
        "    experiments.run_sweep(settings, Path(sys.argv[1]), progress=print)\n"
    )
    sweep = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        workers = {int(sweep.stdout.readline()) for _ in range(2)}
    finally:
        sweep.kill()
        sweep.wait(timeout=60)

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state != "Z"  # a zombie has ended, waiting to be reaped

    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert len(workers) == 2 and not left
