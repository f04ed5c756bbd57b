"""`public-goods run --resume`: a run stopped at any step and resumed from its checkpoint ends exactly as the
uninterrupted run (every logged metric, the result and the lattices), for every update rule; a finished run
goes further with a larger --steps; a resume that would change the game is refused before anything is
written."""

import json
import os

import numpy as np
import pytest

from apps.public_goods.checkpoints import load_run
from apps.public_goods.experiments import Trajectory, make_model, simulate
from apps.public_goods.model import METHODS, GameConfig
from core.cli import main
from core.runs import RunDir, process_identity

TIMING = ("seconds", "steps_per_second")


def run(run_dir, *args) -> int:
    return main(["public-goods", "run", "--size", "8", "--r", "4.2", "--run-dir", str(run_dir), *args])


def results(run_dir) -> tuple[str, dict, dict]:
    """(metrics.jsonl's text, eval.json without its timings, the snapshots' lattices)."""
    result = {k: v for k, v in json.loads((run_dir / "eval.json").read_text()).items() if k not in TIMING}
    with np.load(run_dir / "snapshots.npz") as archive:
        lattices = {name: archive[name] for name in archive.files}
    return (run_dir / "metrics.jsonl").read_text(), result, lattices


def stop_after_logging_step(monkeypatch, stop_at: int) -> None:
    """The run dies right after it logged step `stop_at`, as a kill between two checkpoints does."""
    log_metrics = RunDir.log_metrics

    def log_then_die(self, step, metrics):
        log_metrics(self, step, metrics)
        if step == stop_at:
            raise RuntimeError("killed")

    monkeypatch.setattr(RunDir, "log_metrics", log_then_die)


@pytest.mark.parametrize("method", METHODS)
def test_a_stopped_run_resumed_from_its_checkpoint_ends_as_the_uninterrupted_run(
    tmp_path, monkeypatch, method
):
    # the reference policy is refreshed every 5 updates (2 a step): at the checkpoints it is not the policy
    game = ["--method", method, "--steps", "12", "--init", "half", "--ref-refresh", "5"]
    assert run(tmp_path / "whole", *game) == 0
    with monkeypatch.context() as patch:
        stop_after_logging_step(patch, 7)
        with pytest.raises(RuntimeError, match="killed"):
            run(tmp_path / "stopped", *game, "--save-every", "3")
    stopped = RunDir(tmp_path / "stopped")
    assert stopped.read_status()["status"] == "failed"
    assert [path.name for path in stopped.list_checkpoints()] == ["step-3", "step-6"]  # the newest 2 of 2
    assert len(stopped.read_metrics()) == 7

    assert run(tmp_path / "stopped", *game, "--save-every", "3", "--resume") == 0
    status = stopped.read_status()
    assert (status["status"], status["step"]) == ("finished", 12)
    metrics, result, lattices = results(tmp_path / "stopped")
    whole_metrics, whole_result, whole_lattices = results(tmp_path / "whole")
    assert metrics == whole_metrics  # step 7 logged once, as before the stop
    assert result == whole_result
    assert lattices.keys() == whole_lattices.keys() == {"t0", "t1", "t10"}
    for name in lattices:
        np.testing.assert_array_equal(lattices[name], whole_lattices[name])
    assert [path.name for path in stopped.list_checkpoints()] == ["step-9", "step-12"]


def test_a_finished_run_goes_further_with_a_larger_steps(tmp_path):
    game = ["--method", "grpo-gcc", "--steps"]
    assert run(tmp_path / "whole", *game, "11") == 0
    assert run(tmp_path / "longer", *game, "4") == 0
    assert run(tmp_path / "longer", *game, "11", "--resume") == 0
    assert results(tmp_path / "longer")[:2] == results(tmp_path / "whole")[:2]
    changed = RunDir(tmp_path / "longer").read_config()["resumes"][0]["changed"]
    assert changed == {"resume": [False, True], "steps": [4, 11]}


def test_an_absorbed_run_resumed_with_more_steps_stays_absorbed(tmp_path, capsys):
    game = ["--method", "fermi", "--init", "all_d"]
    assert run(tmp_path / "absorbed", *game, "--steps", "5") == 0
    assert run(tmp_path / "absorbed", *game, "--steps", "9", "--resume") == 0
    result = json.loads((tmp_path / "absorbed" / "eval.json").read_text())
    assert (result["absorbed_at"], result["final_cooperation"]) == (0, 0.0)
    assert len(RunDir(tmp_path / "absorbed").read_metrics()) == 1  # no step runs after absorption
    assert "resuming from step 1" in capsys.readouterr().out


def test_a_run_stopped_before_its_first_checkpoint_starts_again(tmp_path, monkeypatch, capsys):
    game = ["--method", "qlearning", "--steps", "6"]
    assert run(tmp_path / "whole", *game) == 0
    with monkeypatch.context() as patch:
        stop_after_logging_step(patch, 2)
        with pytest.raises(RuntimeError):
            run(tmp_path / "early", *game)
    assert run(tmp_path / "early", *game, "--resume") == 0
    assert "no checkpoint yet: starting again from step 0" in capsys.readouterr().out
    assert results(tmp_path / "early")[:2] == results(tmp_path / "whole")[:2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--r", "5.0"], "--resume would go on with other settings (r 4.2 -> 5.0)"),
        (["--seed", "3"], "--resume would go on with other settings (seed 0 -> 3)"),
        (["--method", "ppo"], "cannot resume it with algorithm 'ppo': it is a 'grpo' run"),
        (["--steps", "3"], "the run has reached step 4; --steps 3 would end before it"),
    ],
)
def test_a_resume_that_would_change_the_game_is_refused_before_anything_is_written(
    tmp_path, capsys, args, message
):
    assert run(tmp_path / "run", "--method", "grpo", "--steps", "4") == 0
    before = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path / "run", "--method", "grpo", "--steps", "4", "--resume", *args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    after = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()}
    assert after == before


def test_resume_needs_a_run_to_continue(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path / "nothing", "--resume")
    assert "holds no run to continue" in capsys.readouterr().err


def test_a_resume_while_another_process_runs_it_is_refused_before_anything_is_written(tmp_path, capsys):
    """A second `--resume` of a run still going had interleaved its metrics and crashed the first."""
    assert run(tmp_path / "run", "--method", "fermi", "--steps", "4") == 0
    status = RunDir(tmp_path / "run").status_path
    status.write_text(
        json.dumps(json.loads(status.read_text()) | process_identity(os.getppid()) | {"status": "running"})
    )
    before = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path / "run", "--method", "fermi", "--steps", "8", "--resume")
    assert exit_info.value.code == 2 and "the run is still running (process" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()} == before


def test_a_checkpoint_of_another_lattice_is_named(tmp_path):
    assert run(tmp_path / "run", "--method", "qlearning", "--steps", "2") == 0
    checkpoint = RunDir(tmp_path / "run").latest_checkpoint()
    with pytest.raises(
        ValueError, match=rf"{checkpoint}: not a checkpoint of this run's game \(qlearning, L = 9\)"
    ):
        load_run(checkpoint, GameConfig(size=9, method="qlearning"), seed=0)


def test_simulate_saves_every_n_steps_and_once_at_the_end_and_counts_the_time_before_a_resume():
    saved = []

    def save(model, so_far):
        saved.append((model.steps, len(so_far.cooperation)))

    config = GameConfig(size=6, method="fermi-sync", init="half")
    whole = simulate(config, 0, 7, save=save, save_every=3)
    assert saved == [(3, 4), (6, 7), (7, 8)]  # the trajectory unpadded, the last step saved once

    model = make_model(config, 0)
    so_far = Trajectory([model.cooperation], {0: model.strategy.copy()}, None, 1000.0, 0)
    resumed = simulate(config, 0, 7, start=(model, so_far))
    assert resumed.seconds >= 1000.0 and resumed.cooperation == whole.cooperation

    saved.clear()
    absorbed = simulate(GameConfig(size=6, init="all_d"), 0, 9, save=save, save_every=1)
    assert saved == [(1, 2)] and absorbed.cooperation == [0.0] * 10


def test_a_checkpoint_loads_as_the_run_at_its_step(tmp_path):
    """`load_run` of the step-4 checkpoint: the lattice, step count, generator, cooperation so far, snapshots
    and running time of the run at step 4, as a model stepped 4 times by hand has them."""
    args = ["--method", "fermi-sync", "--init", "half", "--steps", "6", "--save-every", "2"]
    assert run(tmp_path / "run", *args, "--keep-checkpoints", "3") == 0
    rundir = RunDir(tmp_path / "run")
    assert [path.name for path in rundir.list_checkpoints()] == ["step-2", "step-4", "step-6"]
    game = GameConfig(size=8, r=4.2, method="fermi-sync", init="half")
    model, so_far = load_run(rundir.path / "checkpoints" / "step-4", game, seed=0)
    by_hand = make_model(game, 0)
    cooperation = [by_hand.cooperation]
    for _ in range(4):
        by_hand.step()
        cooperation.append(by_hand.cooperation)
    assert 0.0 < cooperation[-1] < 1.0  # not absorbed: the run went on to step 6
    assert (model.steps, so_far.steps_run, so_far.absorbed_at) == (4, 4, None)
    assert model.strategy.dtype == np.int8
    np.testing.assert_array_equal(model.strategy, by_hand.strategy)
    assert model.rng.random(3).tolist() == by_hand.rng.random(3).tolist()
    assert so_far.cooperation == cooperation
    whole = simulate(game, 0, 4)
    assert sorted(so_far.snapshots) == sorted(whole.snapshots) == [0, 1]
    for t in so_far.snapshots:
        np.testing.assert_array_equal(so_far.snapshots[t], whole.snapshots[t])
    assert so_far.seconds > 0.0  # the time run before the checkpoint counts in the resumed run's


def test_a_checkpoint_that_does_not_fit_the_game_is_named(tmp_path):
    """Another lattice size, another update rule, other network sizes or a trajectory that does not end at
    the checkpoint's step: a ValueError naming the checkpoint, not a run that goes on wrongly."""
    checkpoints = {}
    for method in ("fermi", "qlearning", "grpo"):
        assert run(tmp_path / method, "--method", method, "--steps", "2") == 0
        checkpoints[method] = RunDir(tmp_path / method).latest_checkpoint()
    for method, game, detail in [
        ("fermi", GameConfig(size=9, r=4.2), r"a lattice of shape \(8, 8\), not \(9, 9\)"),
        ("qlearning", GameConfig(size=8, r=4.2), "FermiRandomSequential keeps no state"),
        ("grpo", GameConfig(size=8, r=4.2, method="grpo", hidden=16), "size mismatch"),
    ]:
        with pytest.raises(ValueError, match=rf"(?s){checkpoints[method]}: not a checkpoint .*{detail}"):
            load_run(checkpoints[method], game, seed=0)

    state_path = checkpoints["fermi"] / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["cooperation"] = state["cooperation"][:-1]  # 2 values for step 2
    state_path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="2 cooperation values for step 2"):
        load_run(checkpoints["fermi"], GameConfig(size=8, r=4.2), seed=0)


def test_a_q_table_of_another_lattice_is_refused():
    from apps.public_goods.learners import QLearning

    table = QLearning(GameConfig(size=4, method="qlearning")).state_dict()
    learner = QLearning(GameConfig(size=5, method="qlearning"))
    with pytest.raises(ValueError, match=r"a Q table of shape \(16, 2, 2\), not \(25, 2, 2\) \(L = 5\)"):
        learner.load_state_dict(table, model=None)


def test_a_resume_may_change_how_often_it_saves_and_how_many_checkpoints_it_keeps(tmp_path):
    game = ["--method", "qlearning", "--init", "half"]
    assert run(tmp_path / "whole", *game, "--steps", "8") == 0
    assert run(tmp_path / "run", *game, "--steps", "4", "--save-every", "2") == 0
    more = ["--steps", "8", "--save-every", "3", "--keep-checkpoints", "3", "--resume"]
    assert run(tmp_path / "run", *game, *more) == 0
    rundir = RunDir(tmp_path / "run")
    assert [path.name for path in rundir.list_checkpoints()] == ["step-4", "step-6", "step-8"]
    assert results(tmp_path / "run")[:2] == results(tmp_path / "whole")[:2]
    changed = rundir.read_config()["resumes"][0]["changed"]
    assert changed == {
        "resume": [False, True],
        "steps": [4, 8],
        "save_every": [2, 3],
        "keep_checkpoints": [2, 3],
    }


def test_a_finished_run_resumed_with_its_own_steps_ends_as_it_was(tmp_path):
    game = ["--method", "grpo", "--steps", "4"]
    assert run(tmp_path / "run", *game) == 0
    metrics, result, lattices = results(tmp_path / "run")
    assert run(tmp_path / "run", *game, "--resume") == 0
    assert results(tmp_path / "run")[:2] == (metrics, result)
    assert results(tmp_path / "run")[2].keys() == lattices.keys() == {"t0", "t1"}
    status = RunDir(tmp_path / "run").read_status()
    assert (status["status"], status["step"]) == ("finished", 4)


def test_a_run_made_before_a_setting_existed_resumes_at_its_default(tmp_path):
    """config.json without switch_init (a field added later): the run ran with the default, so the resume
    is not refused as a change of the game."""
    game = ["--method", "qlearning", "--init", "half"]
    assert run(tmp_path / "whole", *game, "--steps", "6") == 0
    assert run(tmp_path / "run", *game, "--steps", "3") == 0
    config_path = tmp_path / "run" / "config.json"
    stored = json.loads(config_path.read_text())
    del stored["config"]["switch_init"]
    config_path.write_text(json.dumps(stored))
    assert run(tmp_path / "run", *game, "--steps", "6", "--resume") == 0
    assert results(tmp_path / "run")[:2] == results(tmp_path / "whole")[:2]


def test_a_resumed_run_is_running_from_its_checkpoint_and_fails_there_if_it_dies_at_once(
    tmp_path, monkeypatch
):
    from apps.public_goods import cli

    game = ["--method", "fermi-sync", "--init", "half", "--save-every", "3"]
    assert run(tmp_path / "run", *game, "--steps", "6") == 0
    rundir = RunDir(tmp_path / "run")
    seen = []

    def dies_at_once(*args, **kwargs):
        seen.append(rundir.read_status())
        raise RuntimeError("killed")

    monkeypatch.setattr(cli, "simulate", dies_at_once)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "run", *game, "--steps", "9", "--resume")
    assert [(status["status"], status["step"]) for status in seen] == [("running", 6)]
    status = rundir.read_status()
    assert (status["status"], status["step"]) == ("failed", 6)


def test_a_run_reports_the_mean_cooperation_of_its_last_half(tmp_path):
    assert run(tmp_path / "run", "--method", "fermi-sync", "--init", "half", "--steps", "5") == 0
    cooperation = [row["cooperation"] for row in RunDir(tmp_path / "run").read_metrics()]
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert len(cooperation) == 5 and cooperation[-1] != cooperation[-3]  # the last 2, not the last 3
    assert result["mean_cooperation_last_half"] == pytest.approx(np.mean(cooperation[-2:]))


def test_simulate_saves_a_last_step_that_is_a_multiple_of_save_every_once():
    saved = []
    config = GameConfig(size=6, method="fermi-sync", init="half")
    simulate(config, 0, 6, save=lambda model, so_far: saved.append(model.steps), save_every=3)
    assert saved == [3, 6]


def test_a_learners_checkpoint_restores_the_models_generator_after_building_the_networks(tmp_path):
    """Building the networks draws from the model's generator: its saved state is restored after that, so the
    loaded model's generator is the run's at the checkpoint."""
    assert run(tmp_path / "run", "--method", "grpo", "--steps", "2") == 0
    checkpoint = RunDir(tmp_path / "run").latest_checkpoint()
    model, _ = load_run(checkpoint, GameConfig(size=8, r=4.2, method="grpo"), seed=0)
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["rng"]
    assert model.rng.bit_generator.state == saved


def test_a_run_with_save_every_0_checkpoints_only_its_end(tmp_path):
    assert run(tmp_path / "run", "--method", "fermi-sync", "--steps", "3", "--save-every", "0") == 0
    assert [path.name for path in RunDir(tmp_path / "run").list_checkpoints()] == ["step-3"]


@pytest.mark.parametrize("method", ["fermi", "grpo-gcc"])
def test_a_resumed_models_datacollector_holds_the_whole_run(tmp_path, method):
    """mesa's DataCollector of a model loaded from a checkpoint held the steps after the resume only."""
    assert (
        run(tmp_path / "run", "--method", method, "--steps", "6", "--save-every", "3", "--init", "half") == 0
    )
    config = GameConfig(size=8, r=4.2, method=method, init="half")
    model, _ = load_run(tmp_path / "run" / "checkpoints" / "step-3", config, seed=0)
    model.run(3)
    whole = make_model(config, seed=0)
    whole.run(6)
    resumed = model.datacollector.get_model_vars_dataframe()
    assert len(resumed) == 7
    assert resumed.equals(whole.datacollector.get_model_vars_dataframe())


def test_status_json_follows_the_newest_checkpoint_of_a_run_and_the_jobs_a_sweep_finished(
    tmp_path, monkeypatch
):
    """It kept the step the run started from, and a sweep the jobs finished before it started."""
    written = []
    real = RunDir.set_status
    monkeypatch.setattr(
        RunDir,
        "set_status",
        lambda self, status, **kw: written.append((status, kw["step"])) or real(self, status, **kw),
    )
    assert run(tmp_path / "run", "--method", "fermi", "--steps", "5", "--save-every", "2") == 0
    assert written == [("running", 0), ("running", 2), ("running", 4), ("running", 5), ("finished", 5)]
    written.clear()
    sweep = [
        "public-goods",
        "sweep",
        "--size",
        "5",
        "--steps",
        "2",
        "--average-last",
        "1",
        "--r-values",
        "4,5",
    ]
    assert main([*sweep, "--workers", "1", "--run-dir", str(tmp_path / "sweep")]) == 0
    assert written == [("running", 0), ("running", 1), ("running", 2), ("finished", 2)]
