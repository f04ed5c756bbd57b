"""`public-goods run --resume`: a run stopped at any step and resumed from its checkpoint ends exactly as the
uninterrupted run (every logged metric, the result and the lattices), for every update rule; a finished run
goes further with a larger --steps; a resume that would change the game is refused before anything is
written."""

import json

import numpy as np
import pytest

from apps.public_goods.checkpoints import load_run
from apps.public_goods.experiments import Trajectory, make_model, simulate
from apps.public_goods.model import METHODS, GameConfig
from core.cli import main
from core.runs import RunDir

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
