"""Tests for core/runs.py (the run directory's files, checkpoints), core/atomic.py (atomic writes) and
core/rng_state.py (RNG state).

Run with `python -m pytest tests/core/test_runs.py -q`.
"""

import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from core import atomic, runs
from core.atomic import atomic_directory, write_atomic
from core.rng_state import capture_rng_state, restore_rng_state
from core.runs import RunDir, default_run_dir, failure_recorded, load_checkpoint


@pytest.fixture
def run(tmp_path):
    return RunDir.create(
        tmp_path / "run", {"lr": 1e-3, "seed": 0}, app="math", algorithm="grpo", exist_ok_for_resume=False
    )


def save(run, step, keep_last=None, **overrides):
    state = dict(
        model_state={"w": torch.full((2,), float(step))},
        optimizer_state=None,
        scheduler_state=None,
        trainer_state={"step": step},
        rng_state=capture_rng_state(),
        keep_last=keep_last,
    )
    return run.save_checkpoint(step, **{**state, **overrides})


# -- create, config, default_run_dir -------------------------------------------------------------------------


def test_create_writes_config(run):
    config = run.read_config()
    assert config["app"] == "math" and config["algorithm"] == "grpo"
    assert config["config"] == {"lr": 1e-3, "seed": 0}
    assert config["grpo_suite_version"] and "T" in config["started"]


def test_create_refuses_an_existing_run_without_resume(run):
    with pytest.raises(FileExistsError, match=r"pick another --run-dir \(or pass --resume"):
        RunDir.create(run.path, {"lr": 1e-3}, app="math", algorithm="grpo", exist_ok_for_resume=False)


def test_create_resume_keeps_config_and_records_changes(run):
    before = run.read_config()
    again = RunDir.create(
        run.path, {"lr": 2e-3, "seed": 0}, app="math", algorithm="grpo", exist_ok_for_resume=True
    )
    after = again.read_config()
    assert after["config"] == before["config"] and after["started"] == before["started"]
    assert after["resumes"][0]["changed"] == {"lr": [1e-3, 2e-3]}
    with pytest.raises(ValueError, match="app 'sudoku'"):
        RunDir.create(run.path, {}, app="sudoku", algorithm="grpo", exist_ok_for_resume=True)


def test_forget_last_resume_drops_only_the_refused_resume(run):
    """A refused resume takes back its own entry; the resumes before it stay, with their changes."""
    config = {"lr": 1e-3, "seed": 0}
    RunDir.create(run.path, config | {"lr": 2e-3}, app="math", algorithm="grpo", exist_ok_for_resume=True)
    RunDir.create(run.path, config | {"lr": 5e-3}, app="math", algorithm="grpo", exist_ok_for_resume=True)
    run.forget_last_resume()
    (resume,) = run.read_config()["resumes"]
    assert resume["changed"] == {"lr": [1e-3, 2e-3]}
    run.forget_last_resume()
    assert "resumes" not in run.read_config()


def test_create_with_resume_and_no_run_starts_fresh(tmp_path):
    run = RunDir.create(tmp_path / "new", {"a": 1}, app="math", algorithm="grpo", exist_ok_for_resume=True)
    assert "resumes" not in run.read_config()


def test_default_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = default_run_dir("sudoku")
    assert path.parent.as_posix() == "runs/sudoku" and re.fullmatch(r"\d{8}-\d{6}", path.name)
    assert path.is_dir() and not any(path.iterdir())  # created empty: the name is claimed
    with pytest.raises(ValueError):
        default_run_dir("a/b")


def test_default_run_dirs_of_the_same_second_differ(tmp_path, monkeypatch):
    from datetime import datetime

    import core.runs

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 11, 25, 12, 49, 8)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(core.runs, "datetime", Frozen)
    names = [default_run_dir("math").name for _ in range(3)]  # nothing written in them yet
    assert names == ["20261125-124908", "20261125-124908-2", "20261125-124908-3"]


def test_run_dir_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RunDir(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="notes.txt is a file, not a run directory"):
        RunDir(tmp_path / "notes.txt")


@pytest.mark.parametrize("resume", [False, True])
def test_create_in_or_under_a_file_says_it_is_a_file(tmp_path, resume):
    """Not mkdir's "[Errno 17] File exists" or NotADirectoryError, which do not say what is wrong."""
    rd = tmp_path / "rd"
    rd.write_text("x")
    with pytest.raises(
        FileExistsError, match=f"^run directory {re.escape(str(rd))} is a file, not a directory$"
    ):
        RunDir.create(rd, {}, app="math", algorithm="grpo", exist_ok_for_resume=resume)
    with pytest.raises(FileExistsError, match=f"rd/sub: {re.escape(str(rd))} is a file, not a directory$"):
        RunDir.create(rd / "sub", {}, app="math", algorithm="grpo", exist_ok_for_resume=resume)
    assert rd.read_text() == "x"


# -- metrics and rollouts ------------------------------------------------------------------------------------


def test_metrics_round_trip_with_nan_as_none(run):
    run.log_metrics(
        1,
        {
            "loss": 0.5,
            "n": 3,
            "t": torch.tensor(2.5),
            "np": np.float32(0.25),
            "nan": float("nan"),
            "inf": torch.tensor(float("inf")),
            "one": torch.ones(1, 1),
        },
    )
    run.log_metrics(2, {"loss": 0.25})
    assert run.read_metrics() == [
        {"step": 1, "loss": 0.5, "n": 3, "t": 2.5, "np": 0.25, "nan": None, "inf": None, "one": 1.0},
        {"step": 2, "loss": 0.25},
    ]
    assert "null" in run.metrics_path.read_text().splitlines()[0]


def test_metrics_refuse_non_scalars_and_step_key(run):
    with pytest.raises(TypeError, match="shape"):
        run.log_metrics(1, {"x": torch.ones(2)})
    with pytest.raises(TypeError, match="'x'"):
        run.log_metrics(1, {"x": "text"})
    with pytest.raises(ValueError, match="'step'"):
        run.log_metrics(1, {"step": 1})
    with pytest.raises(ValueError, match="non-negative int"):
        run.log_metrics(-1, {})
    assert run.read_metrics() == []


def test_rollouts_round_trip(run):
    # U+2028 and \r inside strings must not split lines.
    text = {"prompt": "问\u2028题\r", "completion": "答", "rewards": {"fmt": 1.0}, "group": 0}
    run.log_rollouts(
        [
            {
                "step": 1,
                **text,
                "reward": torch.tensor(0.5),
                "advantage": np.float64(-1.0),
                "ids": torch.tensor([1, 2]),
            }
        ]
    )
    assert run.read_rollouts() == [{"step": 1, **text, "reward": 0.5, "advantage": -1.0, "ids": [1, 2]}]
    with pytest.raises(ValueError, match="no 'step'"):
        run.log_rollouts([{"prompt": "p"}])
    with pytest.raises(TypeError, match=r"rollout record 0\['x'\] is a object"):
        run.log_rollouts([{"step": 1, "x": object()}])
    assert len(run.read_rollouts()) == 1  # a bad record writes nothing


def test_malformed_line_names_file_and_line(run):
    run.log_metrics(1, {"loss": 1.0})
    with run.metrics_path.open("a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: malformed JSON"):
        run.read_metrics()


def test_line_without_step_is_an_error(run):
    run.rollouts_path.write_text('{"prompt": "p"}\n')
    with pytest.raises(ValueError, match=r"rollouts\.jsonl:1: expected a JSON object with an int 'step'"):
        run.read_rollouts()


def test_partial_last_line_is_reported_or_ignored_on_request(run):
    run.log_metrics(1, {"loss": 1.0})
    with run.metrics_path.open("a") as f:
        f.write('{"step": 2, "lo')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: the last line has no newline"):
        run.read_metrics()
    assert run.read_metrics(ignore_unfinished_last_line=True) == [{"step": 1, "loss": 1.0}]


def test_truncate_logs_after_equals_an_uninterrupted_run(tmp_path):
    def log(run, steps):
        for step in steps:
            run.log_metrics(step, {"loss": 1.0 / step})
            run.log_rollouts([{"step": step, "completion": f"c{step}-{g}", "group": g} for g in range(2)])

    whole = RunDir.create(tmp_path / "whole", {}, app="a", algorithm="grpo", exist_ok_for_resume=False)
    log(whole, range(1, 6))
    cut = RunDir.create(tmp_path / "cut", {}, app="a", algorithm="grpo", exist_ok_for_resume=False)
    log(cut, range(1, 6))
    with cut.rollouts_path.open("a") as f:
        f.write('{"step": 6, "compl')  # killed mid-line
    assert cut.truncate_logs_after(3) == {"metrics.jsonl": 2, "rollouts.jsonl": 5}
    assert [row["step"] for row in cut.read_metrics()] == [1, 2, 3]
    log(cut, range(4, 6))
    assert cut.metrics_path.read_bytes() == whole.metrics_path.read_bytes()
    assert cut.rollouts_path.read_bytes() == whole.rollouts_path.read_bytes()
    assert cut.truncate_logs_after(5) == {"metrics.jsonl": 0, "rollouts.jsonl": 0}
    assert sorted(os.listdir(cut.path)) == ["config.json", "metrics.jsonl", "rollouts.jsonl"]


def test_truncate_does_not_drop_a_malformed_line_silently(run):
    run.metrics_path.write_text('{"step": 1}\ngarbage\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        run.truncate_logs_after(1)
    assert run.metrics_path.read_text() == '{"step": 1}\ngarbage\n{"step": 2}\n'


# -- eval and status: atomic JSON ----------------------------------------------------------------------------


def test_eval_and_status_are_written_atomically(run):
    run.write_eval({"accuracy": 0.5, "n": torch.tensor(4), "bad": float("nan")})
    run.write_eval({"accuracy": 0.75})
    run.set_status("running", step=3)
    assert run.read_eval() == {"accuracy": 0.75}
    status = run.read_status()
    assert status["status"] == "running" and status["step"] == 3 and status["error"] is None
    assert sorted(os.listdir(run.path)) == ["config.json", "eval.json", "status.json"]


def test_failed_atomic_write_keeps_the_old_file_and_no_temp(run, monkeypatch):
    run.write_eval({"accuracy": 0.5})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(runs.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        run.write_eval({"accuracy": 0.9})
    assert run.read_eval() == {"accuracy": 0.5}
    assert sorted(os.listdir(run.path)) == ["config.json", "eval.json"]


def test_status_validation(run):
    with pytest.raises(ValueError, match="valid: running, finished, failed"):
        run.set_status("done", step=1)
    with pytest.raises(ValueError, match="needs an error"):
        run.set_status("failed", step=1)
    with pytest.raises(ValueError, match="takes no error"):
        run.set_status("finished", step=1, error="x")
    run.set_status("failed", step=2, error="RuntimeError: boom")
    assert run.read_status()["error"] == "RuntimeError: boom"


def test_a_run_killed_while_running_is_told_from_one_still_going(run):
    """A process that records "running" and is killed with SIGKILL leaves a status no reader can trust;
    `process_gone` sees its pid is gone. One still going, another machine's, and one written before
    status.json had a pid are taken at their word."""
    script = "import os, signal, sys; from core.runs import RunDir; "
    script += "RunDir(sys.argv[1]).set_status('running', step=4); os.kill(os.getpid(), signal.SIGKILL)"
    killed = subprocess.Popen([sys.executable, "-c", script, str(run.path)])
    assert killed.wait(timeout=60) == -signal.SIGKILL
    status = run.read_status()
    assert (status["status"], status["step"], status["pid"]) == ("running", 4, killed.pid)
    assert runs.process_gone(status)
    assert not runs.process_gone(status | {"status": "finished"})
    assert not runs.process_gone(status | {"host": status["host"] + "-elsewhere"})
    assert not runs.process_gone({k: v for k, v in status.items() if k != "pid"})
    assert not runs.process_gone(status | {"pid": True})
    assert not runs.process_gone(status | {"pid_ns": "pid:[1]"})  # another container's numbering
    run.set_status("running", step=5)
    status = run.read_status()
    assert status | runs.process_identity(os.getpid()) == status and not runs.process_gone(status)
    assert status["pid_start"] > 0  # Linux
    assert runs.process_gone(status | {"pid_start": status["pid_start"] - 1})  # its pid taken by another


def test_malformed_json_file_names_the_file(run):
    run.eval_path.write_text("{")
    with pytest.raises(ValueError, match=r"eval\.json: malformed JSON"):
        run.read_eval()
    run.eval_path.write_bytes(b'{"a": "\xff"}')  # not UTF-8
    with pytest.raises(ValueError, match=r"eval\.json: malformed JSON: .*utf-8"):
        run.read_eval()


# -- checkpoints ---------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    """Embedding tied to the output head, like a small causal LM."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def make_training(seed):
    torch.manual_seed(seed)
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler):
    ids = torch.randint(0, 7, (5,))  # draws from the global torch RNG, so RNG restoring matters
    loss = nn.functional.cross_entropy(model(ids), torch.roll(ids, 1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def test_checkpoint_round_trip_continues_bitwise(run):
    model, optimizer, scheduler = make_training(0)
    for _ in range(2):
        train_step(model, optimizer, scheduler)
    trainer_state = {"step": 2, "data_position": [0, 10], "scales": {"fmt": 0.5}}
    path = run.save_checkpoint(
        2,
        model_state=model.state_dict(),
        optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(),
        trainer_state=trainer_state,
        rng_state=capture_rng_state(),
        keep_last=2,
    )
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, optimizer, scheduler)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    ckpt = load_checkpoint(path)
    assert ckpt.step == 2 and ckpt.path == path and ckpt.trainer_state == trainer_state
    assert ckpt.model_state.keys() == saved.keys()
    assert all(torch.equal(ckpt.model_state[k], saved[k]) for k in saved)
    fresh, fresh_optimizer, fresh_scheduler = make_training(1)
    fresh.load_state_dict(ckpt.model_state)
    fresh_optimizer.load_state_dict(ckpt.optimizer_state)
    fresh_scheduler.load_state_dict(ckpt.scheduler_state)
    restore_rng_state(ckpt.rng_state)
    train_step(fresh, fresh_optimizer, fresh_scheduler)
    assert fresh.head.weight is fresh.embed.weight  # the tie survives loading
    assert all(torch.equal(fresh.state_dict()[k], expected[k]) for k in expected)


def test_checkpoint_keeps_dtypes_and_views(run):
    base = torch.arange(12.0).reshape(3, 4)
    state = {
        "bf16": torch.ones(3, dtype=torch.bfloat16),
        "ints": torch.arange(4),
        "view": base[1:, ::2],
        "same": base,
    }
    ckpt = load_checkpoint(save(run, 1, model_state=state))
    for name, tensor in state.items():
        assert ckpt.model_state[name].dtype == tensor.dtype and torch.equal(ckpt.model_state[name], tensor)
    assert ckpt.optimizer_state is None and ckpt.scheduler_state is None


def test_hooks_state_round_trip_weights_as_safetensors(run):
    model, optimizer, scheduler = make_training(0)
    train_step(model, optimizer, scheduler)
    hooks_state = {
        "large": model.state_dict(),
        "large_optimizer": optimizer.state_dict(),
        "note": [1, "a"],
        "empty": {},
    }
    path = save(run, 1, hooks_state=hooks_state)
    marker = json.loads((path / "complete").read_text())
    assert {"hooks.safetensors", "hooks.pt"} <= set(marker["files"])
    assert set(load_file(path / "hooks.safetensors")) == {f"large/{k}" for k in model.state_dict()}
    ckpt = load_checkpoint(path)
    assert ckpt.hooks_state.keys() == hooks_state.keys() and ckpt.hooks_state["note"] == [1, "a"]
    assert ckpt.hooks_state["empty"] == {}
    assert all(torch.equal(ckpt.hooks_state["large"][k], v) for k, v in model.state_dict().items())
    fresh, fresh_optimizer, _ = make_training(1)
    fresh.load_state_dict(ckpt.hooks_state["large"])
    fresh_optimizer.load_state_dict(ckpt.hooks_state["large_optimizer"])
    loaded = fresh_optimizer.state_dict()["state"]
    for i, state in optimizer.state_dict()["state"].items():
        assert all(torch.equal(loaded[i][k], v) for k, v in state.items())
    assert load_checkpoint(save(run, 2)).hooks_state == {}  # hooks without state write no file
    assert not (run.checkpoints_dir / "step-2" / "hooks.pt").exists()
    with pytest.raises(ValueError, match="without '/'"):
        save(run, 3, hooks_state={"a/b": 1})
    with pytest.raises(TypeError, match=r"hooks_state\['x'\] is a Random"):
        save(run, 3, hooks_state={"x": random.Random()})


def test_hooks_state_tensor_names_may_hold_a_slash(run):
    """Only the entry name is refused a '/': a tensor name such as a module path may hold one."""
    weights = {"block/0.weight": torch.arange(3.0), "head": torch.ones(2)}
    ckpt = load_checkpoint(save(run, 1, hooks_state={"critic": weights}))
    assert ckpt.hooks_state.keys() == {"critic"}
    assert ckpt.hooks_state["critic"].keys() == weights.keys()
    assert all(torch.equal(ckpt.hooks_state["critic"][k], v) for k, v in weights.items())


def test_pruning_keeps_the_last_k(run):
    for step in range(1, 6):
        save(run, step, keep_last=2)
    assert [p.name for p in run.list_checkpoints()] == ["step-4", "step-5"]
    assert sorted(os.listdir(run.checkpoints_dir)) == ["step-4", "step-5"]
    save(run, 3, keep_last=2)  # resumed from an older one: the new checkpoint is never pruned
    assert [p.name for p in run.list_checkpoints()] == ["step-3", "step-5"]


def test_checkpoints_are_ordered_by_their_step_number_not_its_text(run):
    """step-10 is newer than step-9 (as text it sorts first): it is the latest, and pruning keeps it."""
    for step in (8, 9, 10, 11):
        save(run, step, keep_last=3)
    assert [p.name for p in run.list_checkpoints()] == ["step-9", "step-10", "step-11"]
    assert run.latest_checkpoint().name == "step-11" and run.newest_checkpoint_step() == 11


def test_newest_checkpoint_step_counts_complete_checkpoints_only(run):
    """A step-N directory without its marker (cut off or damaged) is not the step a resume starts from; a
    complete one moved aside by a cut-off replacing save is."""
    save(run, 2)
    (run.checkpoints_dir / "step-7").mkdir()
    assert run.newest_checkpoint_step() == 2
    save(run, 4)
    os.rename(run.checkpoints_dir / "step-4", run.checkpoints_dir / ".replaced-step-4")
    assert run.newest_checkpoint_step() == 4


def test_a_prune_removes_the_complete_marker_first(run, monkeypatch):
    """A prune cut off after its first file must not leave a checkpoint marked complete without its files."""
    save(run, 1, keep_last=1)
    cut_off = []
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: cut_off.append(Path(path)))
    save(run, 2, keep_last=1)
    assert cut_off[-1] == run.checkpoints_dir / "step-1"
    assert not (run.checkpoints_dir / "step-1" / "complete").exists()
    with pytest.warns(UserWarning, match="step-1 has no 'complete' marker: skipped as incomplete"):
        assert [p.name for p in run.list_checkpoints()] == ["step-2"]
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="step-1 has no 'complete' marker"):
        save(run, 3, keep_last=1)  # the next prune removes what the cut-off one left
    assert sorted(os.listdir(run.checkpoints_dir)) == ["step-3"]


def test_saving_the_same_step_again_replaces_it(run):
    save(run, 1)
    save(run, 1, trainer_state={"step": 1, "again": True})
    assert load_checkpoint(run.latest_checkpoint()).trainer_state == {"step": 1, "again": True}
    assert os.listdir(run.checkpoints_dir) == ["step-1"]


def test_a_replacing_save_cut_off_keeps_the_old_checkpoint(run, monkeypatch):
    """The old step-1 is moved aside while its replacement goes in; a save that fails between the two
    renames puts it back, and one killed there leaves it to be put back by the next reader."""
    save(run, 1, keep_last=1)
    rename = os.rename

    def second_rename_fails(src, dst):
        if ".tmp-step-" in str(src):
            raise OSError("disk gone")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="disk gone"):
        save(run, 1, keep_last=1, trainer_state={"step": 1, "again": True})
    monkeypatch.setattr(os, "rename", rename)
    assert os.listdir(run.checkpoints_dir) == ["step-1"]
    assert load_checkpoint(run.latest_checkpoint()).trainer_state == {"step": 1}
    # killed between the renames: only the aside copy is left
    rename(run.checkpoints_dir / "step-1", run.checkpoints_dir / ".replaced-step-1")
    assert run.latest_checkpoint() == run.checkpoints_dir / "step-1"
    assert load_checkpoint(run.latest_checkpoint()).trainer_state == {"step": 1}
    rename(run.checkpoints_dir / "step-1", run.checkpoints_dir / ".replaced-step-1")
    save(run, 2, keep_last=1)  # a save restores it before pruning, then prunes it as older
    assert os.listdir(run.checkpoints_dir) == ["step-2"]


def test_latest_checkpoint_ignores_half_written_ones(run):
    assert run.latest_checkpoint() is None
    save(run, 2)
    (run.checkpoints_dir / "step-9").mkdir()  # no marker
    (run.checkpoints_dir / "step-9" / "model.safetensors").write_bytes(b"")
    (run.checkpoints_dir / ".tmp-step-10-123").mkdir()
    (run.checkpoints_dir / ".tmp-step-10-123" / "complete").write_text("{}")
    with pytest.warns(UserWarning, match=r"step-9 has no 'complete' marker: skipped"):
        assert run.latest_checkpoint() == run.checkpoints_dir / "step-2"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(run.checkpoints_dir / "step-9")
    save(run, 3)  # a new save clears the temp dir left by a killed save
    assert not (run.checkpoints_dir / ".tmp-step-10-123").exists()


def test_checkpoint_refuses_unloadable_state_before_writing(run):
    class Opaque:
        pass

    with pytest.raises(TypeError, match=r"optimizer_state\['state'\] is a Opaque"):
        save(run, 1, optimizer_state={"state": Opaque()})
    with pytest.raises(TypeError, match=r"scheduler_state\['x'\] is a float64"):
        save(run, 1, scheduler_state={"x": np.float64(1.0)})
    with pytest.raises(TypeError, match="trainer_state must be plain JSON"):
        save(run, 1, trainer_state={"scale": float("nan")})
    with pytest.raises(TypeError, match="key 0 is a int"):
        save(run, 1, trainer_state={0: 1})
    with pytest.raises(TypeError, match=r"model_state\['w'\] is a list"):
        save(run, 1, model_state={"w": [1.0]})
    assert not run.checkpoints_dir.exists() or os.listdir(run.checkpoints_dir) == []


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt"])
@pytest.mark.parametrize("damage", [b"garbage", b""])
def test_a_damaged_checkpoint_file_is_named_without_torchs_unsafe_advice(run, name, damage):
    path = save(run, 1, optimizer_state={"state": {}})
    (path / name).write_bytes(damage)
    with pytest.raises(
        ValueError, match=rf"step-1: the checkpoint is damaged: {name} cannot be read"
    ) as info:
        load_checkpoint(path)
    assert "weights_only=False" not in str(info.value)


def test_checkpoint_missing_file_is_an_error(run):
    path = save(run, 1, optimizer_state={"state": {}})
    (path / "optimizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match="optimizer.pt"):
        load_checkpoint(path)


# -- RNG -----------------------------------------------------------------------------------------------------


def make_generators():
    return {
        "torch": torch.Generator().manual_seed(1),
        "numpy": np.random.default_rng(2),
        "numpy_mt": np.random.Generator(np.random.MT19937(3)),
        "python": random.Random(4),
    }


DRAWS = {
    "python random": lambda gens: (random.random(), random.gauss(0, 1)),
    "numpy global": lambda gens: (np.random.random(), np.random.normal()),
    "torch cpu": lambda gens: torch.rand(3).tolist(),
    "torch.Generator": lambda gens: torch.rand(3, generator=gens["torch"]).tolist(),
    "numpy.random.Generator": lambda gens: gens["numpy"].random(3).tolist(),
    "numpy MT19937 Generator": lambda gens: gens["numpy_mt"].random(3).tolist(),
    "random.Random": lambda gens: (gens["python"].random(), gens["python"].gauss(0, 1)),
}


@pytest.mark.parametrize("source", list(DRAWS))
@pytest.mark.parametrize("through_file", [False, True])
def test_rng_restore_repeats_the_draws(source, through_file):
    gens = make_generators()
    draw = DRAWS[source]
    draw(gens)  # leaves a cached gaussian behind where the source has one
    state = capture_rng_state(gens)
    if through_file:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
    expected = draw(gens)
    draw(gens)
    restore_rng_state(state, gens)
    assert draw(gens) == expected


def test_rng_restore_checks_the_generators():
    state = capture_rng_state(make_generators())
    with pytest.raises(ValueError, match="were given to restore"):
        restore_rng_state(state, {"torch": torch.Generator()})
    wrong = {**make_generators(), "torch": random.Random()}
    with pytest.raises(ValueError, match="saved as a torch.Generator but a random.Random was given"):
        restore_rng_state(state, wrong)
    with pytest.raises(TypeError, match="supported"):
        capture_rng_state({"x": np.random.RandomState(0)})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_restore_repeats_the_draws():
    cuda_gen = torch.Generator(device="cuda").manual_seed(5)
    state = capture_rng_state({"cuda": cuda_gen})
    assert len(state["torch_cuda"]) == torch.cuda.device_count()

    def draw():
        global_draw = torch.rand(3, device="cuda").tolist()
        return global_draw, torch.rand(3, generator=cuda_gen, device="cuda").tolist()

    expected = draw()
    draw()
    restore_rng_state(state, {"cuda": cuda_gen})
    assert draw() == expected


def test_cuda_rng_states_are_restored_on_the_devices_there_are(monkeypatch):
    """A checkpoint from 2 GPUs resumed on 1: device 0's state is restored and a warning says the GPU draws
    will differ; as many devices as states restores each on its own device, silently. (CUDA faked.)"""
    state = capture_rng_state()  # before faking CUDA
    cuda_states = [torch.full((8,), 1, dtype=torch.uint8), torch.full((8,), 2, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((int(s[0]), device)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.warns(UserWarning, match="RNG states for 2 CUDA devices but 1 are available; restoring 1"):
        restore_rng_state({**state, "torch_cuda": cuda_states})
    assert restored == [(1, 0)]
    restored.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restore_rng_state({**state, "torch_cuda": cuda_states})
    assert restored == [(1, 0), (2, 1)]


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "final"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not target.exists()  # nothing at the target while it is written
    assert [p.name for p in tmp_path.iterdir()] == ["final"] and (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("killed half way")
    assert [p.name for p in tmp_path.iterdir()] == ["final"] and (target / "a.txt").read_text() == "one"
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("three")
    assert [p.name for p in target.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == [
        "final"
    ]


def test_atomic_directory_puts_back_the_old_directory_when_the_new_one_does_not_land(tmp_path, monkeypatch):
    """Replacing `final/` moves the old one aside, then renames the new one in: a failure between the two
    renames, or a kill there, must not leave the run without `final/`."""
    target = tmp_path / "final"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    real_rename = os.rename

    def rename_fails_for_the_new_one(src, dst):
        if os.path.basename(src).startswith(".final.tmp-"):
            raise OSError("disk full")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_fails_for_the_new_one)
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("two")
    monkeypatch.setattr(os, "rename", real_rename)
    assert [p.name for p in tmp_path.iterdir()] == ["final"] and (target / "a.txt").read_text() == "one"
    # a kill between the renames: the next write (here one that fails) puts the old directory back first
    real_rename(target, tmp_path / f".final.old-{ended_process_pid()}")
    with pytest.raises(RuntimeError):
        with atomic_directory(target):
            raise RuntimeError("killed half way")
    assert [p.name for p in tmp_path.iterdir()] == ["final"] and (target / "a.txt").read_text() == "one"


def test_atomic_directory_refuses_to_replace_a_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("the user's notes")
    with pytest.raises(FileExistsError, match="is a file, not a directory"):
        with atomic_directory(target):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and target.read_text() == "the user's notes"


def test_atomic_directory_refuses_the_current_directory_and_its_parents_and_takes_dot_names(
    tmp_path, monkeypatch
):
    """`debias data --out-dir .` crashed on the empty name; resolved, it would have replaced the current
    directory (copying the rest of it in first). "a/.." is the directory it names; "data/../out" is read as the
    OS reads it."""
    work = tmp_path / "work"
    (work / "a").mkdir(parents=True)
    (work / "notes.txt").write_text("kept")
    monkeypatch.chdir(work)
    for name in (".", "..", "a/..", str(work)):
        with pytest.raises(ValueError, match="holds the current directory; give a directory of its own"):
            with atomic_directory(name):
                pass
    assert sorted(p.name for p in work.iterdir()) == ["a", "notes.txt"]
    with atomic_directory("a/../b") as tmp:
        (tmp / "x").write_text("1")
    assert (work / "b" / "x").read_text() == "1" and sorted(p.name for p in work.iterdir()) == [
        "a",
        "b",
        "notes.txt",
    ]
    (work / "a" / "deep").mkdir()
    with atomic_directory("a/deep/..") as tmp:  # stands for a, replaced whole
        (tmp / "y").write_text("2")
    assert [p.name for p in (work / "a").iterdir()] == ["y"]
    # ".." after a symlink is the target's parent, as the OS and every later reader take it
    (tmp_path / "elsewhere" / "x" / "data").mkdir(parents=True)
    (work / "data").symlink_to(tmp_path / "elsewhere" / "x" / "data")
    with atomic_directory("data/../out") as tmp:
        (tmp / "z").write_text("3")
    assert (tmp_path / "elsewhere" / "x" / "out" / "z").read_text() == "3" and not (work / "out").exists()


def ended_process_pid() -> int:
    """The pid of a process that has ended."""
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(dead.stdout)


def test_atomic_directory_leaves_a_running_writers_old_directory_alone(tmp_path):
    """Writer A moved `final/` aside and is about to rename its new one in: writer B must not put A's old
    directory back (A's rename would then fail) nor delete it."""
    aside = tmp_path / f".final.old-{os.getppid()}"  # a running process
    aside.mkdir()
    (aside / "a.txt").write_text("A's old one")
    with atomic_directory(tmp_path / "final") as out:
        (out / "b.txt").write_text("B's")
    assert (aside / "a.txt").read_text() == "A's old one"
    assert [p.name for p in (tmp_path / "final").iterdir()] == ["b.txt"]


def test_atomic_directory_syncs_its_directories_before_the_rename(tmp_path, monkeypatch):
    """The renamed directory's entries must be durable: every directory inside the temp one, and the temp
    one itself, is fsynced before it becomes `path`."""
    synced = []
    monkeypatch.setattr(atomic, "fsync_dir", lambda path: synced.append(Path(path).name))
    with atomic_directory(tmp_path / "final") as out:
        (out / "sub").mkdir()
        (out / "sub" / "tok.json").write_text("{}")
        temp_name = out.name
    assert synced == ["sub", temp_name, tmp_path.name]  # then the parent, after the rename


def test_atomic_directory_syncs_every_file_before_the_rename(tmp_path, monkeypatch):
    """A file not fsynced before the rename may be empty after a crash, under a name that says complete."""
    synced = []

    def record(path):
        assert not (tmp_path / "final").exists()  # before the rename
        synced.append(Path(path).relative_to(temp).as_posix())

    monkeypatch.setattr(atomic, "fsync_file", record)
    with atomic_directory(tmp_path / "final") as temp:
        (temp / "sub").mkdir()
        (temp / "sub" / "tok.json").write_text("{}")
        (temp / "model.bin").write_bytes(b"w")
    assert sorted(synced) == ["model.bin", "sub/tok.json"]


def test_write_json_refuses_nan_and_keeps_the_old_file(tmp_path):
    """NaN is not JSON: a strict reader of the file would fail on it later."""
    path = tmp_path / "eval.json"
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        atomic.write_json_atomic(path, {"x": float("nan")})
    assert list(tmp_path.iterdir()) == []
    atomic.write_json_atomic(path, {"x": 1.5})
    with pytest.raises(ValueError, match="not JSON compliant"):
        atomic.write_json_atomic(path, {"x": float("inf")})
    assert json.loads(path.read_text()) == {"x": 1.5} and [p.name for p in tmp_path.iterdir()] == [
        "eval.json"
    ]


def test_atomic_writes_remove_the_temps_of_killed_writers_only(tmp_path):
    """A kill during an atomic write leaves `.<name>.tmp-<pid>`; the next write of that path deletes it once
    no process <pid> runs, and leaves a running writer's alone."""
    dead_pid, live_pid = ended_process_pid(), os.getppid()
    (tmp_path / f".model.tmp-{dead_pid}").mkdir()  # atomic_directory's temp is a directory
    (tmp_path / f".status.json.tmp-{dead_pid}").write_text("cut off")  # write_atomic's a file
    for name in ("model", "status.json"):
        (tmp_path / f".{name}.tmp-{live_pid}").write_text("being written")
    with atomic_directory(tmp_path / "model") as out:
        (out / "weights").write_text("w")
    write_atomic(tmp_path / "status.json", b"{}")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["model", "status.json", f".model.tmp-{live_pid}", f".status.json.tmp-{live_pid}"])


def test_a_block_killed_by_sigterm_marks_its_run_failed(run):
    """SIGTERM (torchrun stopping the others, a user's kill) raised SystemExit inside, so status.json says
    failed with the reason instead of "running" forever; the previous handler is put back."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    run.set_status("running", step=0)
    with pytest.raises(SystemExit), failure_recorded(run, step=3):
        os.kill(os.getpid(), signal.SIGTERM)
    status = run.read_status()
    # one process: no word of another (it had said "under torchrun: another process failed" to every kill)
    assert (status["status"], status["step"], status["error"]) == (
        "failed",
        3,
        "SystemExit: terminated by SIGTERM",
    )
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_resume_says_which_settings_changed(tmp_path, capsys):
    RunDir.create(
        tmp_path / "r", {"lr": 0.1, "resume": False}, app="t", algorithm="g", exist_ok_for_resume=False
    )
    RunDir.create(
        tmp_path / "r", {"lr": 0.1, "resume": True}, app="t", algorithm="g", exist_ok_for_resume=True
    )
    assert "changed settings" not in capsys.readouterr().out  # resume itself is no change to say
    RunDir.create(
        tmp_path / "r", {"lr": 0.2, "resume": False}, app="t", algorithm="g", exist_ok_for_resume=True
    )
    assert capsys.readouterr().out.endswith("with changed settings: lr 0.1 -> 0.2\n")  # resume is not said


def test_a_python_caller_gets_its_unused_default_run_dirs_released_at_exit(tmp_path):
    """The command line releases them when a command ends; a script calling the API, when it exits, even
    from another working directory. A directory holding anything stays."""
    script = (
        "import os; from core.runs import default_run_dir; "
        "used = default_run_dir('toy'); (used / 'config.json').write_text('{}'); "
        "default_run_dir('math'); os.chdir(os.sep)"
    )
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True)
    assert [p.relative_to(tmp_path).parent.as_posix() for p in tmp_path.glob("runs/*/*")] == ["runs/toy"]
    assert not (tmp_path / "runs" / "math").exists()


def test_atomic_directory_syncs_the_parent_after_the_rename(tmp_path, monkeypatch):
    """The rename itself is durable only once the parent directory is fsynced after it."""
    synced = []
    monkeypatch.setattr(
        atomic, "fsync_dir", lambda p: synced.append((Path(p), (tmp_path / "final").exists()))
    )
    with atomic_directory(tmp_path / "final") as out:
        (out / "w").write_text("w")
    assert synced[-1] == (tmp_path, True)


def test_write_atomic_syncs_the_file_before_the_replace_and_the_directory_after(tmp_path, monkeypatch):
    """A file not fsynced before it replaces the old one may be empty after a crash; a replace not followed
    by an fsync of its directory may be undone by one."""
    import stat

    path, real_fsync, synced = tmp_path / "status.json", os.fsync, []

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append((kind, path.exists() and path.read_bytes() == b"new"))
        real_fsync(fd)

    path.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", fsync)
    write_atomic(path, b"new")
    assert synced == [("file", False), ("dir", True)]


def test_a_temp_of_a_process_running_under_another_user_is_left_alone(tmp_path, monkeypatch):
    """Signal 0 to another user's process raises PermissionError: it runs, and its write goes on."""
    other, real_kill = ended_process_pid(), os.kill

    def kill(pid, sig):
        if pid == other:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    (tmp_path / f".status.json.tmp-{other}").write_text("being written")
    write_atomic(tmp_path / "status.json", b"{}")
    assert (tmp_path / f".status.json.tmp-{other}").read_text() == "being written"


def test_an_old_directory_left_aside_by_a_killed_writer_is_deleted_once_a_new_one_landed(tmp_path):
    """A writer killed between its rename of the new directory and its removal of the old one leaves
    `.final.old-<pid>`: the next write deletes it, as `final` is whole."""
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "new.txt").write_text("landed")
    aside = tmp_path / f".final.old-{ended_process_pid()}"
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    with atomic_directory(tmp_path / "final") as out:
        (out / "newer.txt").write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert [p.name for p in (tmp_path / "final").iterdir()] == ["newer.txt"]


def test_the_training_run_of_a_model_is_a_run_of_the_app_asking(tmp_path):
    """`tcm evaluate --model <toy run>/final` took the toy run's settings (6 new tokens) as the model's."""
    from core.runs import training_run

    for app in ("toy", "tcm"):
        RunDir.create(
            tmp_path / app, {"max_new_tokens": 6}, app=app, algorithm="grpo", exist_ok_for_resume=False
        )
    assert training_run(tmp_path / "toy" / "final", "tcm") is None
    assert training_run(tmp_path / "tcm" / "final", "tcm").path == tmp_path / "tcm"
    assert training_run(tmp_path / "tcm" / "base_model_large", "tcm").path == tmp_path / "tcm"
    assert training_run(tmp_path / "tcm" / "checkpoints", "tcm") is None  # not a model the run saved


def test_latest_config_applies_the_resumes_in_order(run):
    """Two resumes changing the same setting: the config the run last ran with has the second's value."""
    for lr in (2e-3, 3e-3):
        RunDir.create(run.path, {"lr": lr, "seed": 0}, app="math", algorithm="grpo", exist_ok_for_resume=True)
    stored = run.read_config()
    assert [r["changed"] for r in stored["resumes"]] == [{"lr": [1e-3, 2e-3]}, {"lr": [2e-3, 3e-3]}]
    assert runs.latest_config(stored) == {"lr": 3e-3, "seed": 0}
    assert stored["config"] == {"lr": 1e-3, "seed": 0}  # the first config stays as it was


def test_changed_settings_leave_out_what_a_resume_may_change():
    old = {"lr": 0.1, "device": "cpu", "gone": 1}
    new = {"lr": 0.1, "device": "cuda", "added": True}
    assert runs.changed_settings(old, new) == [
        "added None -> True",
        "device 'cpu' -> 'cuda'",
        "gone 1 -> None",
    ]
    assert runs.changed_settings(old, new, ("device", "added")) == ["gone 1 -> None"]


def test_a_resumed_pipeline_refuses_changed_settings_but_not_what_may_change(tmp_path):
    root = tmp_path / "pipe"
    RunDir.create(
        root, {"n": 4, "device": "cpu"}, app="sudoku", algorithm="pipeline", exist_ok_for_resume=False
    )
    runs.refuse_changed_pipeline(root, {"n": 4, "device": "cuda"}, ("device",))  # where it runs: allowed
    with pytest.raises(ValueError, match=r"other settings \(n 4 -> 5\)"):
        runs.refuse_changed_pipeline(root, {"n": 5, "device": "cpu"}, ("device",))
    # another kind of run is left to RunDir.create to name
    RunDir.create(tmp_path / "grpo", {"n": 4}, app="sudoku", algorithm="grpo", exist_ok_for_resume=False)
    runs.refuse_changed_pipeline(tmp_path / "grpo", {"n": 5}, ())


def test_an_evaluation_refuses_the_run_dir_of_another_app(run, tmp_path):
    runs.refuse_another_apps_run(run.path, "math")  # its own app
    runs.refuse_another_apps_run(tmp_path / "new", "math")  # no run there yet
    with pytest.raises(ValueError, match=r"holds a 'math' run, whose eval.json this would change"):
        runs.refuse_another_apps_run(run.path, "sudoku")


def test_resume_needs_a_run_dir_holding_a_run(run, tmp_path):
    assert runs.run_to_resume(run.path) == run.path
    with pytest.raises(FileNotFoundError, match="give its --run-dir"):
        runs.run_to_resume(None)
    with pytest.raises(FileNotFoundError, match=r"holds no game to continue \(no config.json\)"):
        runs.run_to_resume(tmp_path / "empty", "game")


def test_resume_is_refused_while_another_process_of_this_machine_runs_it(run):
    """A second process resumed a public-goods run still going: both wrote its logs and checkpoints."""
    script = "import sys, time; from core.runs import RunDir; "
    script += "RunDir(sys.argv[1]).set_status('running', step=3); print('up', flush=True); time.sleep(60)"
    going = subprocess.Popen([sys.executable, "-c", script, str(run.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert going.stdout.readline() == "up\n"
        with pytest.raises(
            ValueError, match=rf"^{run.path}: the game is still running \(process {going.pid}\)"
        ):
            runs.run_to_resume(run.path, "game")
    finally:
        going.kill()
        going.wait(timeout=60)
    assert runs.run_to_resume(run.path) == run.path  # killed: its status says running, its process is gone
    parent = run.read_status() | runs.process_identity(os.getppid())  # a live process's "running"
    run.status_path.write_text(json.dumps(parent))
    with pytest.raises(ValueError, match="still running"):
        runs.run_to_resume(run.path)
    for taken_at_its_word in ({"host": "elsewhere"}, {"pid": None}):  # it may have crashed: resumable
        run.status_path.write_text(json.dumps(parent | taken_at_its_word))
        assert runs.run_to_resume(run.path) == run.path
    run.set_status("running", step=3)  # this very process's: a run it stopped itself
    assert runs.run_to_resume(run.path) == run.path


def test_a_run_records_the_source_digest_it_started_and_each_resume_ran_with(run, tmp_path, monkeypatch):
    """The package version is the same at every commit; the digest of the sources tells code apart."""
    import core.runs as runs_module

    now = runs_module.source_digest()
    assert run.read_config()["source"] == now and len(now) == 64
    monkeypatch.setattr(runs_module, "source_digest", lambda: "other")
    RunDir.create(run.path, {"lr": 1e-3, "seed": 0}, app="math", algorithm="grpo", exist_ok_for_resume=True)
    assert runs_module.run_sources(run.read_config()) == [now, "other"]
    assert runs_module.run_sources({"config": {}, "resumes": [{"changed": {}}]}) == [None, None]


def test_the_source_digest_follows_every_python_file_of_the_packages(tmp_path, monkeypatch):
    import core.runs as runs_module

    for package in ("core", "apps", "reward_models"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "a.py").write_text("x = 1\n")
    (tmp_path / "core" / "runs.py").write_text("")
    monkeypatch.setattr(runs_module, "__file__", str(tmp_path / "core" / "runs.py"))
    first = runs_module.source_digest.__wrapped__()
    (tmp_path / "apps" / "a.py").write_text("x = 2\n")
    second = runs_module.source_digest.__wrapped__()
    (tmp_path / "apps" / "notes.txt").write_text("not code")
    assert first != second == runs_module.source_digest.__wrapped__()


def test_resume_is_refused_only_for_a_running_status_of_another_live_process_here(run):
    parent = {"status": "running", "step": 3, **runs.process_identity(os.getppid())}  # a live process
    run.status_path.write_text(json.dumps(parent))
    with pytest.raises(ValueError, match="still running"):
        runs.run_to_resume(run.path)
    resumable = [
        {"status": "finished"},
        {"status": "failed", "error": "RuntimeError: boom"},
        {"pid_ns": "pid:[1]"},  # another container's numbering: cannot be told from a crashed one
        {"pid": 0},
    ]
    for change in resumable:
        run.status_path.write_text(json.dumps(parent | change))
        assert runs.run_to_resume(run.path) == run.path, change
    run.status_path.write_text('{"status": "runn')  # damaged: nothing says it runs
    assert runs.run_to_resume(run.path) == run.path
    for other_shape in ("null", "[1]", '"running"'):  # JSON, but no object: an AttributeError had escaped
        run.status_path.write_text(other_shape)
        assert runs.run_to_resume(run.path) == run.path


def test_resume_needs_a_config_json_in_an_existing_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    message = f"--resume: {tmp_path / 'empty'} holds no run to continue (no config.json); leave out --resume"
    with pytest.raises(FileNotFoundError, match="^" + re.escape(message)):
        runs.run_to_resume(tmp_path / "empty")


def test_a_live_process_is_not_gone_without_a_start_time_or_under_another_user(monkeypatch):
    parent = {"status": "running", **runs.process_identity(os.getppid())}
    assert "pid_start" in parent and not runs.process_gone(parent)
    assert not runs.process_gone({k: v for k, v in parent.items() if k != "pid_start"})  # none recorded

    def denied(pid, signal_number):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(runs.os, "kill", denied)  # the process runs under another user
    assert not runs.process_gone(parent)
    assert runs.process_gone(parent | {"pid_start": parent["pid_start"] + 1})  # its pid taken by another


def test_refuse_existing_run_names_the_config_it_found(tmp_path):
    runs.refuse_existing_run(tmp_path / "none")  # nothing there
    (tmp_path / "empty").mkdir()
    runs.refuse_existing_run(tmp_path / "empty")  # an empty directory (a default run dir) holds no run
    path = RunDir.create(tmp_path / "r", {}, app="t", algorithm="g", exist_ok_for_resume=False).path
    message = (
        f"{path} already holds a run ({path / 'config.json'} exists); pick another --run-dir (or pass "
        "--resume to continue it, where the command has that flag)"
    )
    with pytest.raises(FileExistsError, match="^" + re.escape(message) + "$"):
        runs.refuse_existing_run(path)


def test_a_resumed_pipeline_compares_with_the_settings_it_last_ran_with_resolved(tmp_path, capsys):
    root = tmp_path / "pipe"
    RunDir.create(root, {"n": 4, "k": None}, app="sudoku", algorithm="pipeline", exist_ok_for_resume=False)
    RunDir.create(root, {"n": 5, "k": None}, app="sudoku", algorithm="pipeline", exist_ok_for_resume=True)
    runs.refuse_changed_pipeline(root, {"n": 5, "k": None}, ())  # the latest settings, not the first
    resolve = lambda c: c | {"k": 2 if c["k"] is None else c["k"]}  # noqa: E731
    runs.refuse_changed_pipeline(root, {"n": 5, "k": 2}, (), resolve)  # k left unset then resolves to 2
    message = (
        f"{root}: --resume would keep stages run with other settings (k 2 -> 3; n 5 -> 6); resume with the "
        "run's own settings, or pick a new --run-dir"
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        runs.refuse_changed_pipeline(root, {"n": 6, "k": 3}, (), resolve)


def test_models_in_run_says_models_for_two(tmp_path):
    path = RunDir.create(tmp_path / "r", {}, app="t", algorithm="g", exist_ok_for_resume=False).path
    assert runs.models_in_run(path) == "it holds no model yet (a run saves final/ when it ends)"
    for name in ("final", "base_model"):
        (path / name).mkdir()
        (path / name / "config.json").write_text("{}")
    assert runs.models_in_run(path) == f"its models are {path / 'base_model'}, {path / 'final'}"


def test_changed_settings_are_listed_in_key_order():
    old = {key: 0 for key in "fbdaec"}
    new = {key: 1 for key in "cafebd"}
    assert runs.changed_settings(old, new) == [f"{key} 0 -> 1" for key in "abcdef"]
