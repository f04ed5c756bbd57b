"""The run directory: the contract between a training run and everything that reads its results.

Dashboards, plots and reports read run directories through this module; they never import a trainer.

    config.json      {"app", "algorithm", "grpo_suite_version", "source", "started", "config": {...},
                     "resumes": [...]} (each resume: {"at", "changed": {key: [old, new]}, "source"} against
                     the config the run last ran with, so that `latest_config` replays them; "source": the
                     `source_digest` of the code that ran)
    metrics.jsonl    one JSON object per step: {"step": int, name: float | null, ...}
    rollouts.jsonl   one JSON object per completion: {"step", "prompt", "completion",
                     "rewards": {name: float}, "reward", "advantage", "group", ...} (only "step" is required)
    eval.json        evaluation results (a dict)
    status.json      {"status": "running" | "finished" | "failed", "step": int, "updated": iso time,
                     "error": str | null, "host": str, "pid": int, "pid_ns": str, "pid_start": int} (the
                     writer's machine and process, so a reader tells a run still going from one killed
                     while "running": `process_gone`; the last two on Linux only)
    checkpoints/step-N/  model.safetensors, optimizer.pt, scheduler.pt, rng.pt, trainer_state.json, the
                     trainer hooks' own state if any (hooks.safetensors: its model weights, hooks.pt: the
                     rest) and a `complete` marker (JSON: step, saved, files) written last

Conventions. `step` counts finished optimizer updates: the logs of update N carry step N and `step-N` is
saved after them, so resuming from `step-N` keeps log lines with step <= N (`truncate_logs_after`).
Non-finite floats (NaN, +-inf) are written as JSON null and read back as None. Nothing is lost when the
process is killed: JSON files are replaced atomically, log lines are flushed one by one (a cut-off last line
is reported by the readers and removed on resume), and a checkpoint only appears under its final name once
complete.
One process writes a run (rank 0 under `accelerate launch`). The atomic writes are in core/atomic.py, the RNG
state a checkpoint holds is captured by core/rng_state.py.

Run the tests with `python -m pytest tests/core/test_runs.py -q`.
"""

import atexit
import functools
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from core.atomic import fsync_dir, fsync_file, write_atomic, write_durably, write_json_atomic

STATUSES = ("running", "finished", "failed")
MARKER = "complete"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
TRAINER_STATE_FILE = "trainer_state.json"
HOOKS_TENSORS_FILE = "hooks.safetensors"
HOOKS_STATE_FILE = "hooks.pt"
_CHECKPOINT_NAME = re.compile(r"step-(\d+)")
_TMP_PREFIX = ".tmp-step-"
_REPLACED_PREFIX = ".replaced-step-"  # a checkpoint moved aside while a save of the same step replaces it


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` holds a run: its config.json names the app (a model directory's config.json does not)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "app" in config


def models_in_run(path: str | Path) -> str:
    """What a run directory given for a model holds instead, for the error: the model directories in it and
    in the runs inside it (a pipeline's), or that it holds none yet. Checkpoints are one level deeper
    (checkpoints/step-N), so they are not listed."""

    def found(run: Path) -> list[str]:
        models = []
        for child in sorted(run.iterdir()):
            if not child.is_dir():
                continue
            if is_run_dir(child):
                models += found(child)
            elif (child / "config.json").is_file() or (child / "adapter_config.json").is_file():
                models.append(str(child))
        return models

    models = found(Path(path))
    if not models:
        return "it holds no model yet (a run saves final/ when it ends)"
    return f"its model{'s are' if len(models) > 1 else ' is'} {', '.join(models)}"


def _exit_on_sigterm(signum, frame):
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun stops the others when one fails
    raise SystemExit("terminated by SIGTERM" + (" (another process may have failed)" if launched else ""))


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Inside, SIGTERM raises SystemExit (main thread only), so that `except BaseException` marks the run
    failed in status.json instead of the process dying with it still "running"."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def failure_recorded(run: "RunDir", step: int | Callable[[], int] = 0) -> Iterator[None]:
    """A block whose error (SIGTERM and Ctrl-C included) marks `run` failed with it, then is re-raised: a
    dead run must not stay "running" on the dashboard. `step` is the step to record, or a function giving
    the step reached when the error came."""
    with sigterm_as_exit():
        try:
            yield
        except BaseException as err:
            reached = step() if callable(step) else step
            run.set_status("failed", step=reached, error=f"{type(err).__name__}: {err}")
            raise


def training_run(model: str | Path, app: str) -> "RunDir | None":
    """The `app` run a model directory was saved in (`<run>/final`, `<run>/final_large`, or the tiny base
    models a run built, `<run>/base_model`, `<run>/base_model_large`), if any: evaluations take their unset
    data and prompt settings from it, as the model was trained. Another app's run is none: its settings
    mean other things (a toy run's max_new_tokens is not what a TCM answer needs)."""
    path = Path(model)
    if not (path.name.startswith(("final", "base_model")) and is_run_dir(path.parent)):
        return None
    run = RunDir(path.parent)
    return run if run.read_config().get("app") == app else None


def process_identity(pid: int) -> dict[str, Any]:
    """Where process `pid` is and since when, as status.json records its writer: the machine, the pid, and
    on Linux the pid namespace (containers sharing a hostname number processes apart) and the process's
    start time in clock ticks since boot (a pid reused by a later process has another)."""
    identity: dict[str, Any] = {"host": socket.gethostname(), "pid": pid}
    try:
        identity["pid_ns"] = os.readlink("/proc/self/ns/pid")
        stat = Path(f"/proc/{pid}/stat").read_text()
        identity["pid_start"] = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22, after "(comm)"
    except (OSError, ValueError, IndexError):  # no /proc (not Linux), or the process is gone
        pass
    return identity


def process_gone(status: Mapping[str, Any]) -> bool:
    """Whether a "running" status.json was written by a process that no longer exists: the run was killed
    (SIGKILL, the OOM killer) before it could record its end, and never will. Told only for a writer of this
    machine and pid namespace: another's status, or one without a pid (written before status.json had one),
    is taken at its word. A pid now held by a process started at another time counts as gone.

    >>> process_gone({"status": "running", **process_identity(os.getpid())})
    False
    """
    pid = _writer_here(status)
    if status.get("status") != "running" or pid is None:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        pass
    started = process_identity(pid).get("pid_start")
    return "pid_start" in status and started is not None and started != status["pid_start"]


def refuse_another_kind_of_run(path: str | Path, stored: Mapping[str, Any], app: str, algorithm: str) -> None:
    """ValueError when the run at `path` (its config.json's contents `stored`) is not an `app` `algorithm`
    run: a resume must continue a run of its own kind."""
    for field, value in (("app", app), ("algorithm", algorithm)):
        if stored.get(field) != value:
            raise ValueError(
                f"{path}: cannot resume it with {field} {value!r}: it is a {stored.get(field)!r} run"
            )


def refuse_another_apps_run(path: str | Path, app: str) -> None:
    """ValueError when `path` holds a run of another app: an evaluation adds its results to the eval.json of
    a run of its own app only (the other's results are that run's own, and its dashboard page reads them)."""
    config_path = Path(path) / "config.json"
    if config_path.is_file() and (other := _read_json(config_path).get("app")) != app:
        raise ValueError(
            f"{path}: it holds a {other!r} run, whose eval.json this would change; give the --run-dir of a "
            f"{app} run, or a new one"
        )


def run_to_resume(run_dir: str | Path | None, what: str = "run") -> Path:
    """The directory `--resume` continues: a FileNotFoundError without a --run-dir or without a run there
    (its config.json), a ValueError while another process of this machine still runs it (two writers would
    interleave its logs and checkpoints); `what` names the kind of run in the message."""
    if run_dir is None:
        raise FileNotFoundError(f"--resume continues an earlier {what}: give its --run-dir")
    if not (Path(run_dir) / "config.json").is_file():
        raise FileNotFoundError(
            f"--resume: {run_dir} holds no {what} to continue (no config.json); leave out --resume to start "
            "one there"
        )
    try:
        status = RunDir(run_dir).read_status()
    except (OSError, ValueError):  # none yet, or damaged: nothing says it runs
        status = {}
    if not isinstance(status, dict):  # JSON of another shape (null): damaged too
        status = {}
    if _running_elsewhere(status):
        raise ValueError(
            f"{run_dir}: the {what} is still running (process {status['pid']}); --resume continues one that "
            "has stopped: wait for it to end, or stop it first"
        )
    return Path(run_dir)


def _running_elsewhere(status: Mapping[str, Any]) -> bool:
    """Whether a "running" status.json was written by another live process of this machine and pid
    namespace (one of another machine, or without a pid, cannot be told from a crashed one, and is not)."""
    pid = _writer_here(status)
    return status.get("status") == "running" and pid not in (None, os.getpid()) and not process_gone(status)


def _writer_here(status: Mapping[str, Any]) -> int | None:
    """The pid that wrote a status.json on this machine and in this pid namespace; None for another
    machine's, another namespace's, or one without a valid pid."""
    here, pid = process_identity(os.getpid()), status.get("pid")
    if status.get("host") != here["host"] or status.get("pid_ns") != here.get("pid_ns"):
        return None
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


def refuse_existing_run(path: str | Path) -> None:
    """FileExistsError when `path` already holds a run (config.json): a fresh run may not be started there."""
    config_path = Path(path) / "config.json"
    if config_path.exists():
        raise FileExistsError(
            f"{path} already holds a run ({config_path} exists); pick another --run-dir (or pass "
            "--resume to continue it, where the command has that flag)"
        )


def refuse_a_file_in_the_way(path: str | Path, what: str) -> None:
    """FileExistsError when `path`, or the nearest of its parents that exists, is a file, so that no
    directory can be made there; `what` names the path for the message ("--run-dir", "run directory").
    mkdir's own errors ("[Errno 17] File exists", NotADirectoryError) do not say that."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "" if part == path else f": {part}"
                raise FileExistsError(f"{what} {path}{where} is a file, not a directory")
            return


def latest_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The config a run last ran with, from the contents of its config.json: the first config with each
    resume's changes applied in order."""
    config = dict(run_config["config"])
    for resume in run_config.get("resumes", []):
        config.update({key: new for key, (_, new) in resume["changed"].items()})
    return config


def changed_settings(
    old: Mapping[str, Any], new: Mapping[str, Any], may_change: Sequence[str] = ()
) -> list[str]:
    """The settings that differ between two configs, as "key old -> new" in key order, leaving out those a
    resume may change (`may_change`: where and how it runs, not what it computes).

    >>> changed_settings({"lr": 0.1, "device": "cpu"}, {"lr": 0.2, "device": "cuda"}, ("device",))
    ['lr 0.1 -> 0.2']
    """
    return [
        f"{key} {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if key not in may_change and old.get(key) != new.get(key)
    ]


def refuse_changed_pipeline(
    root: str | Path,
    config: Mapping[str, Any],
    may_change: Sequence[str],
    resolve: Callable[[dict[str, Any]], Mapping[str, Any]] = dict,
) -> None:
    """A resumed pipeline keeps the stages it finished: a ValueError naming every setting that differs from
    those it last ran with (`resolve`d as the command resolves a field left unset), `may_change` aside. A
    directory holding another kind of run is left to `RunDir.create` to name."""
    stored = RunDir(root).read_config()
    if stored.get("algorithm") != "pipeline":
        return
    changed = changed_settings(resolve(latest_config(stored)), config, may_change)
    if changed:
        raise ValueError(
            f"{root}: --resume would keep stages run with other settings ({'; '.join(changed)}); resume with "
            "the run's own settings, or pick a new --run-dir"
        )


def default_run_dir(app: str) -> Path:
    """`runs/<app>/<YYYYmmdd-HHMMSS>` relative to the working directory (local time), or with `-2`, `-3`, ...
    after it when a run started in the same second already has that name. The directory is created here,
    empty, which claims the name: two commands started in the same second get two directories."""
    if not app or "/" in app or "\\" in app:
        raise ValueError(f"app name {app!r} must be a non-empty name without path separators")
    base = Path("runs") / app / datetime.now().strftime("%Y%m%d-%H%M%S")
    made = [part for part in (base.parent, *base.parent.parents) if not part.exists()]  # deepest first
    base.parent.mkdir(parents=True, exist_ok=True)
    path, n = base, 1
    while True:
        try:
            path.mkdir()
            _CLAIMED_RUN_DIRS.append([p.absolute() for p in (path, *made)])  # released whatever the cwd then
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


_CLAIMED_RUN_DIRS: list[list[Path]] = []  # each claimed default run directory and the parents made for it


def release_unused_run_dirs() -> None:
    """Remove the default run directories this process claimed and left empty (a command that stopped on
    bad input before writing its run), and the parents made for them that are empty too (`runs/<app>`);
    a directory holding anything stays. The command line calls it when a command ends, and the process's
    exit for a caller of the Python API."""
    while _CLAIMED_RUN_DIRS:
        for path in _CLAIMED_RUN_DIRS.pop():  # deepest first: a parent empties once its child is gone
            try:
                path.rmdir()  # only an empty directory
            except OSError:
                break


atexit.register(release_unused_run_dirs)


@dataclass(frozen=True)
class Checkpoint:
    """One loaded checkpoint; every tensor is on the CPU (`load_state_dict` moves them where they belong)."""

    path: Path
    step: int
    model_state: dict[str, Tensor]
    optimizer_state: dict | None
    scheduler_state: dict | None
    trainer_state: dict
    rng_state: dict
    hooks_state: dict  # {} when the hooks saved none


class RunDir:
    """A handle on an existing run directory; `RunDir.create` makes a new one (or reopens one to resume)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise FileNotFoundError(f"{self.path} is a file, not a run directory")
        if not self.path.is_dir():
            raise FileNotFoundError(f"run directory {self.path} does not exist")

    @classmethod
    def create(
        cls,
        path: str | Path,
        config: Mapping[str, Any],
        *,
        app: str,
        algorithm: str,
        exist_ok_for_resume: bool,
    ) -> "RunDir":
        """Create a run at `path` and write config.json.

        A directory that already holds a run (it has config.json) is refused unless `exist_ok_for_resume`;
        then config.json keeps the original config and start time and gains a `resumes` entry recording the
        time and the config keys that changed since the run last ran ({key: [old, new]}, old from
        `latest_config`). Resuming with another app or algorithm is
        refused.
        With `exist_ok_for_resume` and no run there yet, a fresh run is created as usual.
        """
        path = Path(path)
        refuse_a_file_in_the_way(path, "run directory")
        config_path = path / "config.json"
        new_config = _jsonable(dict(config), "config")
        if not exist_ok_for_resume:
            refuse_existing_run(path)
        if config_path.exists():
            run = cls(path)
            stored = run.read_config()
            refuse_another_kind_of_run(path, stored, app, algorithm)
            old = latest_config(stored)
            changed = {
                key: [old.get(key), new_config.get(key)]
                for key in sorted(old.keys() | new_config.keys())
                if old.get(key) != new_config.get(key)
            }
            said = {k: v for k, v in changed.items() if k not in ("resume", "run_dir")}
            if said:  # recorded below in any case; said here, where the user sees it
                print(
                    f"resuming {path} with changed settings: "
                    + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in said.items())
                )
            stored.setdefault("resumes", []).append(
                {"at": _now(), "changed": changed, "source": source_digest()}
            )
            write_json_atomic(config_path, stored)
            return run
        path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            config_path,
            {
                "app": app,
                "algorithm": algorithm,
                "grpo_suite_version": _version(),
                "source": source_digest(),
                "started": _now(),
                "config": new_config,
            },
        )
        return cls(path)

    # -- paths ---------------------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def rollouts_path(self) -> Path:
        return self.path / "rollouts.jsonl"

    @property
    def eval_path(self) -> Path:
        return self.path / "eval.json"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    # -- writing -------------------------------------------------------------------------------------------

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append `{"step": step, **metrics}`; values: numbers, one-element tensors or numpy scalars."""
        _check_step(step)
        if "step" in metrics:
            raise ValueError("metrics must not contain the key 'step'; pass the step as the first argument")
        row: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            if isinstance(value, Tensor | np.ndarray):
                if math.prod(value.shape) != 1:
                    raise TypeError(f"metric {key!r} is an array of shape {tuple(value.shape)}, not a scalar")
                value = value.item()
            converted = _jsonable(value, f"metric {key!r}")
            if converted is not None and not isinstance(converted, int | float):
                raise TypeError(f"metric {key!r} is a {type(value).__name__}, not a number")
            row[key] = converted
        _append_lines(self.metrics_path, [row])

    def log_rollouts(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append one line per record; every record needs an int "step" (tensors become numbers or lists)."""
        rows = []
        for i, record in enumerate(records):
            if "step" not in record:
                raise ValueError(f"rollout record {i} has no 'step'")
            _check_step(record["step"])
            rows.append(_jsonable(dict(record), f"rollout record {i}"))
        _append_lines(self.rollouts_path, rows)

    def write_eval(self, results: Mapping[str, Any]) -> None:
        write_json_atomic(self.eval_path, _jsonable(dict(results), "eval results"))

    def forget_last_resume(self) -> None:
        """Drop the `resumes` entry `create` added last: a resume refused before it ran anything did not
        change the run's settings, so a later resume must not find them in `latest_config`."""
        stored = self.read_config()
        if stored.get("resumes"):
            stored["resumes"].pop()
            if not stored["resumes"]:  # as the run had it: create adds the list with its first entry
                del stored["resumes"]
            write_json_atomic(self.config_path, stored)

    def set_status(self, status: str, *, step: int, error: str | None = None) -> None:
        """Write status.json; `error` (a message) is required for "failed" and refused otherwise."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; valid: {', '.join(STATUSES)}")
        if (status == "failed") != (error is not None):
            needs = "needs an" if status == "failed" else "takes no"
            raise ValueError(f"status {status!r} {needs} error message")
        _check_step(step)
        status_json = {
            "status": status,
            "step": step,
            "updated": _now(),
            "error": error,
            **process_identity(os.getpid()),
        }
        write_json_atomic(self.status_path, status_json)

    # -- reading -------------------------------------------------------------------------------------------

    def read_config(self) -> dict:
        return _read_json(self.config_path)

    def read_eval(self) -> dict:
        return _read_json(self.eval_path)

    def read_status(self) -> dict:
        return _read_json(self.status_path)

    def read_metrics(self, *, ignore_unfinished_last_line: bool = False) -> list[dict]:
        """All metric rows ([] before the first step). A malformed line raises ValueError naming file and
        line; so does a last line without its newline (cut off by a kill), unless
        `ignore_unfinished_last_line` (for readers of a live run, whose writer may be mid-line)."""
        return _read_jsonl(self.metrics_path, ignore_unfinished_last_line)

    def read_rollouts(self, *, ignore_unfinished_last_line: bool = False) -> list[dict]:
        """All rollout rows; errors as in `read_metrics`."""
        return _read_jsonl(self.rollouts_path, ignore_unfinished_last_line)

    def truncate_logs_after(self, step: int) -> dict[str, int]:
        """Drop metric and rollout lines with step > `step` and a cut-off last line, so that a run resumed
        from checkpoint `step` logs exactly what an uninterrupted run would (use step 0 when resuming
        without a checkpoint). Each file is rewritten atomically. Returns {file name: lines removed}."""
        _check_step(step)
        removed = {}
        for path in (self.metrics_path, self.rollouts_path):
            if not path.exists():
                continue
            keep = []
            lines = _split_lines(path)
            for number, raw, finished in lines:
                if finished and _parse_line(path, number, raw)["step"] <= step:
                    keep.append(raw + b"\n")
            removed[path.name] = len(lines) - len(keep)
            if removed[path.name]:
                write_atomic(path, b"".join(keep))
        return removed

    # -- checkpoints ---------------------------------------------------------------------------------------

    def save_checkpoint(
        self,
        step: int,
        *,
        model_state: Mapping[str, Tensor],
        optimizer_state: dict | None,
        scheduler_state: dict | None,
        trainer_state: dict,
        rng_state: dict,
        keep_last: int | None,
        hooks_state: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write `checkpoints/step-<step>/` atomically, then keep only the newest `keep_last` (None: all).

        Everything goes to `checkpoints/.tmp-step-<step>-<pid>` first, each file fsynced, the `complete`
        marker last; the directory is then renamed into place. An existing `step-<step>` is replaced: moved
        to `.replaced-step-<step>` until the new one is in place, and put back if the save fails or is killed
        before that (`_restore_replaced`). Temp dirs left by a killed save are deleted first. Pruning keeps
        the new checkpoint and the newest others. Tensors that share storage (tied weights) are saved as
        separate copies because safetensors refuses shared storage; `model.load_state_dict` keeps the tie,
        since both names copy into one parameter.
        `trainer_state` must be strict JSON (tuples come back as lists); optimizer, scheduler and RNG states
        must be plain data that `torch.load(weights_only=True)` accepts; both are checked before writing.
        `hooks_state` (`TrainerHooks.state_dict()`, e.g. a second model and its optimizer): each top-level
        entry that is a non-empty flat {name: tensor} map (a model's state dict) goes to hooks.safetensors
        as `<entry>/<name>`, the rest to hooks.pt under the same rule as the optimizer state.
        """
        _check_step(step)
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (or None to keep all), got {keep_last}")
        trainer_json = _strict_json(trainer_state, "trainer_state")
        pickled = {OPTIMIZER_FILE: optimizer_state, SCHEDULER_FILE: scheduler_state, RNG_FILE: rng_state}
        for name, state in pickled.items():
            if state is not None:
                _check_weights_only(state, name.removesuffix(".pt") + "_state")
        tensors = _unshared_cpu_tensors(model_state)
        hook_tensors, hook_rest = _split_hooks_state(hooks_state or {})
        if hook_rest:
            _check_weights_only(hook_rest, "hooks_state")
        pickled[HOOKS_STATE_FILE] = hook_rest or None

        self.checkpoints_dir.mkdir(exist_ok=True)
        # One writer per run: temp dirs still here were cut off by a kill and are only wasted disk.
        for stale in self.checkpoints_dir.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(stale)
        self._restore_replaced()
        tmp = self.checkpoints_dir / f"{_TMP_PREFIX}{step}-{os.getpid()}"
        final = self.checkpoints_dir / f"step-{step}"
        tmp.mkdir()
        try:
            save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", "step": str(step)})
            fsync_file(tmp / MODEL_FILE)
            files = [MODEL_FILE]
            if hook_tensors:
                save_file(hook_tensors, str(tmp / HOOKS_TENSORS_FILE), metadata={"format": "pt"})
                fsync_file(tmp / HOOKS_TENSORS_FILE)
                files.append(HOOKS_TENSORS_FILE)
            for name, state in pickled.items():
                if state is not None:
                    with open(tmp / name, "wb") as f:
                        torch.save(state, f)
                        f.flush()
                        os.fsync(f.fileno())
                    files.append(name)
            write_durably(tmp / TRAINER_STATE_FILE, trainer_json)
            files.append(TRAINER_STATE_FILE)
            marker = {"step": step, "saved": _now(), "files": files}
            write_durably(tmp / MARKER, json.dumps(marker).encode())
            fsync_dir(tmp)
            replaced = self.checkpoints_dir / f"{_REPLACED_PREFIX}{step}"
            if final.exists():  # rename cannot replace a non-empty directory: move the old one aside first
                os.rename(final, replaced)
                fsync_dir(self.checkpoints_dir)
            os.rename(tmp, final)
            fsync_dir(self.checkpoints_dir)
            shutil.rmtree(replaced, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            self._restore_replaced()
            raise
        if keep_last is not None:
            # Never prune the one just saved, even when newer ones exist (a resume from an older checkpoint).
            others = [path for path in self.list_checkpoints() if path != final]
            for path in others[: max(0, len(others) - (keep_last - 1))]:
                (path / MARKER).unlink(missing_ok=True)  # first: a prune cut off leaves no "complete" part
                shutil.rmtree(path)
            for path in self.checkpoints_dir.iterdir():  # what such a cut-off prune left: never resumable
                if _CHECKPOINT_NAME.fullmatch(path.name) and not (path / MARKER).is_file():
                    shutil.rmtree(path)
        return final

    def _restore_replaced(self) -> None:
        """Put back a checkpoint moved aside by a save that replaced it and was cut off before its new copy
        was in place (`.replaced-step-N` without `step-N`); one whose replacement landed is deleted."""
        for aside in self.checkpoints_dir.glob(_REPLACED_PREFIX + "*"):
            final = self.checkpoints_dir / f"step-{aside.name.removeprefix(_REPLACED_PREFIX)}"
            if final.exists():
                shutil.rmtree(aside)
            else:
                os.rename(aside, final)
                fsync_dir(self.checkpoints_dir)

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints (step-N with the marker), oldest first; temp and cut-off ones are skipped.
        A checkpoint a cut-off replacing save left aside is restored first."""
        if not self.checkpoints_dir.is_dir():
            return []
        self._restore_replaced()
        found = []
        for path in self.checkpoints_dir.iterdir():
            match = _CHECKPOINT_NAME.fullmatch(path.name)
            if match and (path / MARKER).is_file():
                found.append((int(match.group(1)), path))
            elif match:  # saves are renamed into place with their marker: a prune cut off, or damage since
                warnings.warn(
                    f"{path} has no {MARKER!r} marker: skipped as incomplete (the next save that prunes "
                    "removes it)",
                    stacklevel=2,
                )
        return [path for _, path in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        checkpoints = self.list_checkpoints()
        return checkpoints[-1] if checkpoints else None

    def newest_checkpoint_step(self) -> int | None:
        """The step `latest_checkpoint` would resume from, read without touching the directory (a checkpoint
        moved aside by a cut-off save counts, as it would be put back); None without one."""
        if not self.checkpoints_dir.is_dir():
            return None
        steps = [
            int(match.group(1))
            for path in self.checkpoints_dir.iterdir()
            if (match := _CHECKPOINT_NAME.fullmatch(path.name.replace(_REPLACED_PREFIX, "step-", 1)))
            and (path / MARKER).is_file()
        ]
        return max(steps, default=None)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a complete checkpoint directory; pickled files load with `weights_only=True` only."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {MARKER!r} marker): a save was cut off")
    marker = _read_json(path / MARKER)
    missing = [name for name in marker["files"] if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} lacks {', '.join(missing)}")

    def corrupt(name: str, err: Exception) -> ValueError:
        # not torch's own message: it suggests weights_only=False, which this loader never uses
        lines = str(err).splitlines()
        detail = lines[0] if lines and not isinstance(err, pickle.UnpicklingError) else type(err).__name__
        return ValueError(  # the path first: the command line shows it as a bad input, no traceback
            f"{path}: the checkpoint is damaged: {name} cannot be read as plain data and tensors ({detail}); "
            "delete this checkpoint directory to resume from the one before"
        )

    def torch_file(name: str) -> Any:
        if name not in marker["files"]:
            return None
        try:
            return torch.load(path / name, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            raise corrupt(name, err) from err

    def tensor_file(name: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(path / name, device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError
            raise corrupt(name, err) from err

    hooks_state = torch_file(HOOKS_STATE_FILE) or {}
    if HOOKS_TENSORS_FILE in marker["files"]:
        for key, tensor in tensor_file(HOOKS_TENSORS_FILE).items():
            entry, name = key.split("/", 1)
            hooks_state.setdefault(entry, {})[name] = tensor
    return Checkpoint(
        path=path,
        step=marker["step"],
        model_state=tensor_file(MODEL_FILE),
        optimizer_state=torch_file(OPTIMIZER_FILE),
        scheduler_state=torch_file(SCHEDULER_FILE),
        trainer_state=_read_json(path / TRAINER_STATE_FILE),
        rng_state=torch_file(RNG_FILE),
        hooks_state=hooks_state,
    )


# -- files -------------------------------------------------------------------------------------------------


def _check_step(step: object) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


@functools.cache
def source_digest() -> str:
    """sha256 of the suite's Python sources (core, apps, reward_models; path and bytes of each file): the
    code a run ran, which the package version, unchanged between commits, does not tell apart."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in ("core", "apps", "reward_models"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def run_sources(run_config: Mapping[str, Any]) -> list[str | None]:
    """The `source_digest` of the code a run started with and of each resume, from the contents of its
    config.json (None where it was not recorded yet)."""
    return [run_config.get("source")] + [resume.get("source") for resume in run_config.get("resumes", [])]


def _version() -> str:
    try:
        return metadata.version("grpo-suite")
    except metadata.PackageNotFoundError:  # running from a source tree that was never pip-installed
        return "unknown (not installed)"


def _jsonable(value: Any, where: str) -> Any:
    """Plain JSON data from tensors, numpy values, paths, tuples; non-finite floats become None."""
    if isinstance(value, Tensor):
        value = value.detach().tolist()
    elif isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int):  # bool is an int
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; JSON keys must be strings")
            out[key] = _jsonable(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, list | tuple):
        return [_jsonable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"{where} is a {type(value).__name__}, which cannot be written as JSON")


def _strict_json(value: Any, where: str) -> bytes:
    # No conversion here: what is saved must come back exactly, so NaN, a tensor or an int key (json would
    # turn it into a string) is an error, not a silent change.
    _check_string_keys(value, where)
    try:
        return json.dumps(value, allow_nan=False, indent=2).encode()
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where} must be plain JSON data (no tensors, NaN or infinity): {e}") from e


def _check_string_keys(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; JSON keys must be strings")
            _check_string_keys(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_string_keys(item, f"{where}[{i}]")


# Exact types: subclasses (namedtuple, defaultdict, IntEnum, numpy scalars) are refused by weights_only.
_WEIGHTS_ONLY_MAPPINGS = (dict, OrderedDict)
_WEIGHTS_ONLY_SEQUENCES = (list, tuple, set)
_WEIGHTS_ONLY_LEAVES = (
    str,
    bytes,
    int,
    float,
    complex,
    bool,
    type(None),
    torch.Size,
    torch.dtype,
    torch.device,
)


def _check_weights_only(value: Any, where: str) -> None:
    """Fail at save time, not at resume time, on anything `torch.load(weights_only=True)` would refuse."""
    if type(value) in _WEIGHTS_ONLY_MAPPINGS:
        for key, item in value.items():
            _check_weights_only(key, f"{where} key")
            _check_weights_only(item, f"{where}[{key!r}]")
    elif type(value) in _WEIGHTS_ONLY_SEQUENCES:
        for i, item in enumerate(value):
            _check_weights_only(item, f"{where}[{i}]")
    elif type(value) not in _WEIGHTS_ONLY_LEAVES and not isinstance(value, Tensor):
        raise TypeError(
            f"{where} is a {type(value).__name__}, which torch.load(weights_only=True) refuses; "
            "convert it to tensors or plain python data"
        )


def _split_hooks_state(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict]:
    """(tensors for hooks.safetensors as `<entry>/<name>`, the other entries for hooks.pt): an entry goes
    to safetensors when it is a non-empty flat {str: tensor} map, i.e. a model's weights."""
    tensors, rest = {}, {}
    for key, value in state.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(f"hooks_state keys must be non-empty strings without '/', got {key!r}")
        is_weights = (
            isinstance(value, Mapping)
            and value
            and all(isinstance(name, str) and isinstance(tensor, Tensor) for name, tensor in value.items())
        )
        if is_weights:
            tensors.update({f"{key}/{name}": t for name, t in _unshared_cpu_tensors(value).items()})
        else:
            rest[key] = value
    return tensors, rest


def _unshared_cpu_tensors(model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    seen: set[tuple[str, int]] = set()
    out = {}
    for name, tensor in model_state.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach()
        storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if storage in seen:  # tied or otherwise shared: safetensors refuses shared storage, so copy it
            tensor = tensor.clone()
        seen.add(storage)
        out[name] = tensor.to("cpu").contiguous()
    return out


def _split_lines(path: Path) -> list[tuple[int, bytes, bool]]:
    """(1-based line number, bytes without the newline, whether the newline was there) for every line."""
    # Split on b"\n" only: text mode would also split on the \r and U+2028 that JSON strings may contain.
    data = path.read_bytes()
    if not data:
        return []
    parts = data.split(b"\n")
    finished = data.endswith(b"\n")
    if finished:
        parts.pop()
    return [(i + 1, part, finished or i < len(parts) - 1) for i, part in enumerate(parts)]


def _parse_line(path: Path, number: int, raw: bytes) -> dict:
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}:{number}: malformed JSON line: {e}") from e
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        raise ValueError(f"{path}:{number}: expected a JSON object with an int 'step', got {raw[:80]!r}")
    return row


def _read_jsonl(path: Path, ignore_unfinished_last_line: bool) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for number, raw, finished in _split_lines(path):
        if not finished:
            if ignore_unfinished_last_line:
                break
            raise ValueError(
                f"{path}:{number}: the last line has no newline: it was cut off by a killed process "
                "(resuming the run removes it)"
            )
        rows.append(_parse_line(path, number, raw))
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON: {e}") from e


def _append_lines(path: Path, rows: list[dict]) -> None:
    # Serialize everything first so that a bad row writes nothing.
    lines = [json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows]
    with path.open("a", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
            f.flush()
