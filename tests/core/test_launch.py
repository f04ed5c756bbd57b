"""core.launch: the run directory a train command resolves before it builds anything."""

import json
import re
from dataclasses import replace
from functools import partial

import pytest

from core import launch
from core.cli import main
from core.launch import BUILT_WITH, build_in_run, build_settings, summary_table, with_run_dir
from core.policy import LoraSettings
from core.runs import RunDir
from core.trainer import GRPOConfig


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_dir_that_is_a_file_is_named_as_one(tmp_path, resume):
    rd = tmp_path / "rd"
    rd.write_text("x")
    with pytest.raises(FileExistsError, match=r"^--run-dir \S+rd is a file, not a directory$"):
        with_run_dir(GRPOConfig(run_dir=str(rd), resume=resume), "toy")
    with pytest.raises(FileExistsError, match=r"--run-dir \S+rd/sub: \S+rd is a file, not a directory$"):
        with_run_dir(GRPOConfig(run_dir=str(rd / "sub"), resume=resume), "toy")


def test_a_train_command_given_a_file_as_run_dir_is_a_command_line_error(tmp_path, capsys):
    """Before, toy train built its model into <run_dir>/base_model and died with a NotADirectoryError."""
    rd = tmp_path / "rd"
    rd.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["toy", "train", "--run-dir", str(rd)])
    assert exit_info.value.code == 2
    assert f"error: --run-dir {rd} is a file, not a directory" in capsys.readouterr().err
    assert rd.read_text() == "x"


def test_a_resume_of_another_kind_of_run_is_refused_before_anything_is_built(tmp_path):
    """math train --resume --algo codistill on a grpo run had built and SFT'd a large base model inside it
    before RunDir.create refused it."""
    RunDir.create(tmp_path / "run", {}, app="math", algorithm="grpo", exist_ok_for_resume=False)
    config = GRPOConfig(run_dir=str(tmp_path / "run"), resume=True)
    with pytest.raises(ValueError, match="cannot resume it with algorithm 'codistill': it is a 'grpo' run"):
        with_run_dir(config, "math", "codistill")
    with pytest.raises(ValueError, match="cannot resume it with app 'toy': it is a 'math' run"):
        with_run_dir(config, "toy")
    assert with_run_dir(config, "math").run_dir == str(tmp_path / "run")


def test_a_fresh_run_reuses_a_base_model_only_built_whole_with_its_settings_and_a_resume_keeps_it(tmp_path):
    """A start stopped before its run existed leaves base_model/: the same command reuses it (its SFT took
    minutes), another one (another seed) builds its own, as it does over a build that was cut off."""
    path, built = tmp_path / "base_model", []

    def build(out, stop=False):
        built.append(out)
        out.mkdir()
        (out / "config.json").write_text(str(len(built)))
        if stop:
            raise KeyboardInterrupt

    seed0, seed1 = {"seed": 0, "max_steps": 5}, {"seed": 1, "max_steps": 5}
    build_in_run(path, build, resume=False, device="cpu", settings=seed0)
    assert json.loads((path / BUILT_WITH).read_text()) == seed0
    build_in_run(path, build, resume=False, device="cpu", settings=seed0)
    assert len(built) == 1 and (path / "config.json").read_text() == "1"
    build_in_run(path, build, resume=False, device="cpu", settings=seed1)
    assert len(built) == 2 and (path / "config.json").read_text() == "2"
    build_in_run(path, build, resume=True, device="cpu", settings=seed0)  # a resume keeps what its run has
    assert len(built) == 2
    with pytest.raises(KeyboardInterrupt):
        build_in_run(path, partial(build, stop=True), resume=False, device="cpu", settings=seed0)
    build_in_run(path, build, resume=False, device="cpu", settings=seed0)  # the cut-off build is not reused
    assert len(built) == 4 and (path / "config.json").read_text() == "4"
    assert build_settings(GRPOConfig(seed=3, resume=True)) == build_settings(GRPOConfig(seed=3))
    longer = GRPOConfig(seed=3, max_steps=9, save_every=2, keep_checkpoints=1, rollouts_to_log=0)
    assert build_settings(longer) == build_settings(GRPOConfig(seed=3))  # how long it trains, what it keeps
    assert build_settings(GRPOConfig(learning_rate=1)) != build_settings(GRPOConfig())
    assert build_settings(GRPOConfig(seed=3))["seed"] == 3 and "resume" not in build_settings(GRPOConfig())
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a"}\n')
    before = build_settings(GRPOConfig(run_dir=str(data)))  # any field naming a file: its size and time
    assert before["files"] == {"run_dir": [data.stat().st_size, data.stat().st_mtime_ns]}
    data.write_text('{"prompt": "b"}\n{"prompt": "c"}\n')  # edited in place: other data, built anew
    assert build_settings(GRPOConfig(run_dir=str(data))) != before


def test_a_resume_below_its_newest_checkpoint_is_refused_before_anything_is_written(tmp_path, capsys):
    """It trained nothing, saved final/ again and evaluated again, and the model was past --max-steps."""
    rd = tmp_path / "rd"
    assert main(["toy", "train", "--run-dir", str(rd), "--max-steps", "2", "--save-every", "1"]) == 0
    assert RunDir(rd).newest_checkpoint_step() == 2
    config, status = (rd / "config.json").read_text(), (rd / "status.json").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["toy", "train", "--run-dir", str(rd), "--resume", "--max-steps", "1"])
    assert exit_info.value.code == 2
    assert f"{rd}: its newest checkpoint is at step 2, past --max-steps 1" in capsys.readouterr().err
    assert (rd / "config.json").read_text() == config and (rd / "status.json").read_text() == status
    # a checkpoint a cut-off save moved aside counts, and the directory is left as it is
    (rd / "checkpoints" / "step-2").rename(rd / "checkpoints" / ".replaced-step-2")
    assert RunDir(rd).newest_checkpoint_step() == 2
    assert (rd / "checkpoints" / ".replaced-step-2").is_dir()


def test_a_warning_of_a_command_is_one_line_naming_the_command(tmp_path):
    """Python's format printed the warning's file and line and the source line that raised it."""
    import subprocess
    import sys

    out = tmp_path / "p.csv"
    command = [sys.executable, "-m", "core.cli", "sudoku", "generate", "--size", "9", "--num-puzzles", "5"]
    done = subprocess.run([*command, "--output", str(out)], capture_output=True, text=True, check=True)
    assert done.stderr == (
        f"grpo-suite sudoku generate: warning: {out}: its 5 puzzles split into 5 train / 0 held out; sft, train "
        "and eval need both: generate more puzzles\n"
    )


def test_a_resume_whose_max_steps_is_its_newest_checkpoints_step_goes_on(tmp_path):
    """A finished run resumed with its own --max-steps (it evaluates again) is not refused; one step less is."""
    run = RunDir.create(tmp_path / "run", {}, app="toy", algorithm="grpo", exist_ok_for_resume=False)
    (run.checkpoints_dir / "step-2").mkdir(parents=True)
    (run.checkpoints_dir / "step-2" / "complete").write_text("{}")
    assert RunDir(tmp_path / "run").newest_checkpoint_step() == 2
    config = GRPOConfig(run_dir=str(tmp_path / "run"), resume=True, max_steps=2)
    assert with_run_dir(config, "toy").run_dir == str(tmp_path / "run")
    with pytest.raises(ValueError, match="newest checkpoint is at step 2, past --max-steps 1"):
        with_run_dir(replace(config, max_steps=1), "toy")


def test_build_settings_stat_files_only_not_directories(tmp_path):
    """A field naming a directory (one that files are written into) is not a file whose edit means other data:
    its changing time must not make a rerun rebuild its base model."""
    (tmp_path / "rd").mkdir()
    assert build_settings(GRPOConfig(run_dir=str(tmp_path / "rd")))["files"] == {}


@pytest.mark.parametrize("lora", [False, True])
def test_policy_for_loads_a_given_model_with_the_configs_lora_settings(tmp_path, monkeypatch, lora):
    """--model is loaded as it is (nothing built), with rank, alpha and seed of the config in their places."""
    loaded = []
    monkeypatch.setattr(
        launch, "load_policy", lambda path, *, lora, device: loaded.append((path, lora, device))
    )
    config = GRPOConfig(model=str(tmp_path / "m"), lora=lora, lora_r=4, lora_alpha=12, seed=3)
    launch.policy_for(config, lambda path: pytest.fail("built a model although --model was given"))
    expected = LoraSettings(r=4, alpha=12, seed=3) if lora else None
    assert loaded == [(tmp_path / "m", expected, "cpu")]


def test_a_resume_without_a_run_dir_is_refused_not_started_fresh(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^--resume continues an earlier run: give its --run-dir$"):
        with_run_dir(GRPOConfig(resume=True), "toy")
    assert not (tmp_path / "runs").exists()  # no default run directory claimed


def test_a_fresh_run_into_a_directory_holding_a_run_is_refused_before_anything_is_built(tmp_path):
    run = RunDir.create(tmp_path / "run", {}, app="toy", algorithm="grpo", exist_ok_for_resume=False)
    message = f"{run.path} already holds a run ({run.path / 'config.json'} exists); pick another --run-dir"
    with pytest.raises(FileExistsError, match="^" + re.escape(message)):
        with_run_dir(GRPOConfig(run_dir=str(run.path)), "toy")
    assert with_run_dir(GRPOConfig(run_dir=str(tmp_path / "new")), "toy").run_dir == str(tmp_path / "new")


def test_a_resume_below_its_newest_checkpoint_says_how_to_continue_it(tmp_path):
    run = RunDir.create(tmp_path / "run", {}, app="toy", algorithm="grpo", exist_ok_for_resume=False)
    (run.checkpoints_dir / "step-3").mkdir(parents=True)
    (run.checkpoints_dir / "step-3" / "complete").write_text("{}")
    message = (
        f"{run.path}: its newest checkpoint is at step 3, past --max-steps 2; give --max-steps 3 or more"
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + " to continue it$"):
        with_run_dir(GRPOConfig(run_dir=str(run.path), resume=True, max_steps=2), "toy")


def test_build_settings_leave_out_the_logging_backend():
    """report_to is what a run logs to, not what its base model is built from."""
    assert build_settings(GRPOConfig(report_to="tensorboard")) == build_settings(GRPOConfig())


def test_a_fresh_run_reuses_a_base_model_built_with_the_same_files(tmp_path):
    """The settings written after the build are the whole settings, the data files' size and time included."""
    path, built = tmp_path / "base_model", []

    def build(out):
        built.append(out)
        out.mkdir()
        (out / "config.json").write_text("{}")

    settings = {"seed": 0, "files": {"data": [12, 345]}}
    build_in_run(path, build, resume=False, device="cpu", settings=settings)
    assert json.loads((path / BUILT_WITH).read_text()) == settings
    build_in_run(path, build, resume=False, device="cpu", settings=dict(settings))
    assert built == [path]
    build_in_run(path, build, resume=False, device="cpu", settings=settings | {"files": {"data": [12, 346]}})
    assert built == [path, path]


def test_policy_for_builds_the_offline_model_into_the_runs_base_model(tmp_path, monkeypatch):
    built, loaded = [], []
    monkeypatch.setattr(
        launch, "build_in_run", lambda path, build, **kwargs: built.append((path, build, kwargs))
    )
    monkeypatch.setattr(
        launch, "load_policy", lambda path, *, lora, device: loaded.append((path, lora, device))
    )
    config = GRPOConfig(run_dir=str(tmp_path / "run"), resume=True, seed=5)

    def build(path):
        pass

    launch.policy_for(config, build)
    settings = build_settings(config)
    assert built == [
        (tmp_path / "run" / "base_model", build, {"resume": True, "device": "cpu", "settings": settings})
    ]
    assert loaded == [(tmp_path / "run" / "base_model", None, "cpu")]


def test_summary_table_shows_each_metric_in_its_column():
    history = [
        {"step": 1, "reward": 0.125, "zero_spread_frac": 0.25, "entropy": 1.5, "step_time": 2.0},
        {"step": 2, "reward": 0.75, "zero_spread_frac": 0.5, "entropy": 1.25, "step_time": 3.5},
    ]
    assert summary_table(history).splitlines() == [
        "  step   reward zero-spread  entropy  step s",
        "     1    0.125        0.25    1.500    2.00",
        "     2    0.750        0.50    1.250    3.50",
    ]
    assert summary_table([]) == "no steps run"
