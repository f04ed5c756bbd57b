"""`reward-model train --resume`: a training stopped after a checkpoint and resumed ends with the weights,
metrics and results of an uninterrupted one; a fresh start over checkpoints and a resume with other
settings are refused."""

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apps.debias.data import DataConfig, generate_splits, write_splits
from core.config import add_config_arguments, build_config
from core.data import InputError
from core.runs import RunDir, process_identity
from reward_models.train import RMTrainConfig, _check_same_data, _check_same_settings, train_reward_model

# 24 rows in batches of 8: 3 steps an epoch, 6 in all, so the run crosses an epoch's reshuffle
TINY = ["--max-train-rows", "24", "--batch-size", "8", "--epochs", "2", "--save-every", "2"]
TINY += ["--hidden-size", "16", "--num-layers", "1", "--max-length", "96", "--vocab-size", "200"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm-resume") / "data"
    write_splits(generate_splits(DataConfig(num_prompts=60)), path)
    return path


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, RMTrainConfig)
    return parser.parse_args(argv)


def config(data, run_dir, *flags: str) -> RMTrainConfig:
    return build_config(RMTrainConfig, parse("--data", str(data), "--run-dir", str(run_dir), *TINY, *flags))


class Stop(Exception):
    pass


def stop_at_optimizer_step(monkeypatch, n: int) -> list[int]:
    """AdamW.step raises on its n-th call (before updating); returns the list counting the calls."""
    calls, step = [0], torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise Stop(f"stopped at optimizer step {n}")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    return calls


def metric_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_training_ends_as_an_uninterrupted_one(data, tmp_path, monkeypatch):
    straight = train_reward_model(config(data, tmp_path / "straight"))

    # step 3 logged, step-2 the checkpoint: the resume continues the first epoch's order, then reshuffles
    calls = stop_at_optimizer_step(monkeypatch, 4)
    clock, read = time.perf_counter, []

    def jumping_clock():  # 1000 s later after its first reading (the training's start)
        read.append(1)
        return clock() + (1000.0 if len(read) > 1 else 0.0)

    monkeypatch.setattr(time, "perf_counter", jumping_clock)
    with pytest.raises(Stop):
        train_reward_model(config(data, tmp_path / "cut"))  # an attempt whose clock says 1000 s went by
    assert [row["step"] for row in metric_lines(tmp_path / "cut")] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-2"]
    assert not (tmp_path / "cut" / "model").exists()
    status = json.loads((tmp_path / "cut" / "status.json").read_text())
    assert (status["status"], status["step"]) == ("failed", 2)  # the step its checkpoint resumes from

    monkeypatch.undo()
    calls = stop_at_optimizer_step(monkeypatch, 0)  # counts only
    # given no setting but where the run is: the run's config.json has them
    resumed = train_reward_model(
        build_config(RMTrainConfig, parse("--run-dir", str(tmp_path / "cut"), "--resume"))
    )
    assert calls[0] == 4  # steps 3 to 6, from the checkpoint of step 2
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-6"]  # the last kept

    weights = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed_weights = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert weights.keys() == resumed_weights.keys()
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)
    assert metric_lines(tmp_path / "cut") == metric_lines(tmp_path / "straight")  # step 3 logged once
    assert resumed["final_train_loss"] == straight["final_train_loss"]
    assert resumed["test"] == straight["test"]
    # eval.json's settings do not tell a resumed training from an uninterrupted one (its data path was
    # resolved and `resume` true), and its seconds are summed over both attempts
    assert {k: v for k, v in resumed["config"].items() if k != "run_dir"} == {
        k: v for k, v in straight["config"].items() if k != "run_dir"
    }
    assert "resume" not in resumed["config"] and resumed["config"]["data"] == str(data.resolve())
    assert 1000 < resumed["train_seconds"] < 1000 + 60 and straight["train_seconds"] < 60
    status = json.loads((tmp_path / "cut" / "status.json").read_text())
    assert (status["status"], status["step"]) == ("finished", 6)
    run = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert (run["app"], run["algorithm"], run["config"]["hidden_size"]) == (
        "reward_model",
        "bradley_terry",
        16,
    )
    assert [list(r["changed"]) for r in run["resumes"]] == [["resume"]]


def test_a_resume_of_another_kind_of_run_is_refused(data, tmp_path):
    (tmp_path / "math").mkdir()
    (tmp_path / "math" / "config.json").write_text(
        json.dumps({"app": "math", "algorithm": "grpo", "config": {}})
    )
    with pytest.raises(ValueError, match="cannot resume it with app 'reward_model': it is a 'math' run"):
        train_reward_model(config(data, tmp_path / "math", "--resume"))
    with pytest.raises(FileExistsError, match="already holds a run"):
        train_reward_model(config(data, tmp_path / "math"))


def test_a_resume_of_a_training_another_live_process_runs_is_refused(data, tmp_path):
    run = RunDir.create(
        tmp_path / "rm", {}, app="reward_model", algorithm="bradley_terry", exist_ok_for_resume=False
    )
    run.status_path.write_text(json.dumps({"status": "running", "step": 2} | process_identity(os.getppid())))
    with pytest.raises(
        ValueError, match=rf"{run.path}: the reward-model training is still running \(process"
    ):
        train_reward_model(config(data, run.path, "--resume"))
    assert not (run.path / "metrics.jsonl").exists()


def test_resume_without_a_checkpoint_starts_over(data, tmp_path, monkeypatch):
    straight = train_reward_model(config(data, tmp_path / "straight", "--save-every", "0"))
    stop_at_optimizer_step(monkeypatch, 2)
    with pytest.raises(Stop):
        train_reward_model(config(data, tmp_path / "cut", "--save-every", "0"))
    assert not (tmp_path / "cut" / "checkpoints").exists()
    monkeypatch.undo()
    resumed = train_reward_model(config(data, tmp_path / "cut", "--save-every", "0", "--resume"))
    assert [row["step"] for row in metric_lines(tmp_path / "cut")] == [1, 2, 3, 4, 5, 6]
    assert resumed["final_train_loss"] == straight["final_train_loss"]


def test_a_fresh_start_over_checkpoints_and_a_resume_with_other_settings_are_refused(
    data, tmp_path, monkeypatch
):
    stop_at_optimizer_step(monkeypatch, 4)
    with pytest.raises(Stop):
        train_reward_model(config(data, tmp_path / "cut"))
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="holds checkpoints of an unfinished training; pass --resume"):
        train_reward_model(config(data, tmp_path / "cut"))
    with pytest.raises(ValueError, match=r"other settings \(learning_rate 0.001 -> 0.01\)"):
        train_reward_model(config(data, tmp_path / "cut", "--resume", "--learning-rate", "0.01"))
    # where and how it runs may change
    train_reward_model(config(data, tmp_path / "cut", "--resume", "--save-every", "5"))
    assert (tmp_path / "cut" / "model" / "model.safetensors").is_file()


def test_a_resume_of_a_finished_training_checks_its_settings_and_keeps_its_model(data, tmp_path):
    """The last step's checkpoint lets a resume of a finished training refuse other settings (it had
    retrained from scratch over the model); with the same ones it trains nothing and evaluates again."""
    first = train_reward_model(config(data, tmp_path / "run"))
    weights = load_file(tmp_path / "run" / "model" / "model.safetensors")
    with pytest.raises(ValueError, match=r"other settings \(seed 0 -> 4\)"):
        train_reward_model(config(data, tmp_path / "run", "--resume", "--seed", "4"))
    again = train_reward_model(config(data, tmp_path / "run", "--resume"))
    assert again["test"] == first["test"] and len(metric_lines(tmp_path / "run")) == 6
    resaved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert all(torch.equal(weights[k], resaved[k]) for k in weights)
    train_reward_model(config(data, tmp_path / "nockpt", "--save-every", "0"))
    with pytest.raises(FileExistsError, match="holds the model of a finished training .* no checkpoint"):
        train_reward_model(config(data, tmp_path / "nockpt", "--save-every", "0", "--resume"))


def test_save_every_below_zero_is_refused():
    with pytest.raises(ValueError, match="save_every must be >= 0, got -1"):
        RMTrainConfig(save_every=-1)


def test_a_resume_on_changed_data_is_refused_naming_the_splits(data, tmp_path, monkeypatch):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    stop_at_optimizer_step(monkeypatch, 4)
    with pytest.raises(Stop):
        train_reward_model(config(copy, tmp_path / "cut"))
    monkeypatch.undo()
    lines = (copy / "train.jsonl").read_text().splitlines()
    (copy / "train.jsonl").write_text("\n".join(reversed(lines)) + "\n")  # same rows, another order
    with pytest.raises(
        ValueError, match=f"whose train rows differ from those of --data {re.escape(str(copy))}"
    ):
        train_reward_model(config(copy, tmp_path / "cut", "--resume"))
    assert not (tmp_path / "cut" / "model").exists()


def test_a_resume_with_the_data_path_spelled_otherwise_goes_on(data, tmp_path, monkeypatch):
    stop_at_optimizer_step(monkeypatch, 4)
    with pytest.raises(Stop):
        train_reward_model(config(data, tmp_path / "cut"))  # an absolute --data
    monkeypatch.undo()
    monkeypatch.chdir(data.parent)
    calls = stop_at_optimizer_step(monkeypatch, 1)  # past the checks: the resume has begun
    with pytest.raises(Stop):
        train_reward_model(config("data", tmp_path / "cut", "--resume"))
    assert calls == [1]


def test_every_step_holds_a_whole_batch_and_a_part_epoch_counts_as_a_step(data, tmp_path, monkeypatch):
    """20 rows in batches of 8, one epoch: ceil(20 / 8) = 3 steps, and step 3 takes the first epoch's 4
    leftover rows and 4 of the next shuffle, so every step holds 8 rows."""
    import reward_models.train as train_module

    batches, flatten = [], train_module.flatten

    def recorded(rows):  # the training steps' batches come first, then the evaluation's splits
        batches.append(rows)
        return flatten(rows)

    monkeypatch.setattr(train_module, "flatten", recorded)
    flags = ("--max-train-rows", "20", "--epochs", "1", "--save-every", "0")
    results = train_reward_model(config(data, tmp_path / "run", *flags))
    assert results["steps"] == 3
    assert [row["step"] for row in metric_lines(tmp_path / "run")] == [1, 2, 3]
    steps = batches[:3]
    assert [len(b) for b in steps] == [8, 8, 8]
    first_epoch = steps[0] + steps[1] + steps[2][:4]
    assert len({id(row) for row in first_epoch}) == 20  # each training row once before the reshuffle
    assert {id(row) for row in steps[2][4:]} <= {id(row) for row in first_epoch}


def test_a_resume_after_a_split_was_removed_is_refused_naming_it(data, tmp_path, monkeypatch):
    """A split the checkpoint recorded and --data no longer has counts as changed data."""
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    assert (copy / "heldout.jsonl").is_file()
    stop_at_optimizer_step(monkeypatch, 4)
    with pytest.raises(Stop):
        train_reward_model(config(copy, tmp_path / "cut"))
    monkeypatch.undo()
    (copy / "heldout.jsonl").unlink()
    with pytest.raises(ValueError, match="whose heldout rows differ from those of --data"):
        train_reward_model(config(copy, tmp_path / "cut", "--resume"))
    assert not (tmp_path / "cut" / "model").exists()


def test_the_last_step_is_checkpointed_when_save_every_does_not_divide_it(data, tmp_path):
    """6 steps, --save-every 4: step-4, then step-6 (the last, which a resume of the finished training reads)
    in its place."""
    train_reward_model(config(data, tmp_path / "run", "--save-every", "4"))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-6"]


def test_the_learning_rate_warms_up_then_decays_linearly(data, tmp_path, monkeypatch):
    """--warmup-ratio 0.5 of 6 steps at 1e-3: from 0 up over 3 steps, then down to 0 at the end; the rates
    of the six optimizer steps are 1e-3 x (0, 1/3, 2/3, 1, 2/3, 1/3)."""
    rates, step = [], torch.optim.AdamW.step

    def recorded(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recorded)
    train_reward_model(config(data, tmp_path / "run", "--warmup-ratio", "0.5", "--save-every", "0"))
    assert rates == pytest.approx([1e-3 * k / 3 for k in (0, 1, 2, 3, 2, 1)])


def test_a_resume_on_data_with_a_split_its_checkpoint_did_not_have_is_refused():
    def record(**digests):
        return {"data_dir": "/d", "splits": {name: {"sha256": d} for name, d in digests.items()}}

    saved = record(train="t", validation="v")
    _check_same_data(saved, record(train="t", validation="v"), Path("ckpt"), "/d")  # the same: accepted
    with pytest.raises(InputError, match="whose heldout rows differ from those of --data /d"):
        _check_same_data(saved, record(train="t", validation="v", heldout="h"), Path("ckpt"), "/d")


def test_a_resume_may_change_where_it_runs_but_not_the_rows_it_trains_on():
    saved = {"max_train_rows": 24, "device": "cpu", "save_every": 2, "data": "d", "model": None}
    _check_same_settings(saved, {**saved, "device": "cuda", "save_every": 5}, Path("ckpt"))
    with pytest.raises(InputError, match=r"other settings \(max_train_rows 24 -> 12\)"):
        _check_same_settings(saved, {**saved, "max_train_rows": 12}, Path("ckpt"))
