"""Reading run directories for the dashboards: discovery, path confinement, config diffs, metrics and a lazy
rollout index. Plain functions without Streamlit, so they are tested directly; `dashboards/state.py` caches
them for the pages.

Everything here only reads. A run is any directory under the runs folder that holds `config.json` (the
contract of `core/runs.py`); it is named by its path relative to that folder, e.g. `toy/20261124-145000`.
Names come from query parameters, so `resolve_run` refuses absolute paths, `..`, and symlinks that leave
the folder.

Run the tests with `python -m pytest tests/dashboards -q`.
"""

import io
import json
import math
import os
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from core.runs import STATUSES, RunDir, is_run_dir, latest_config, process_gone

MAX_DEPTH = 4  # runs/<app>/<name> is depth 2; deeper folders are searched a little, not forever
SKIP_DIRS = {"checkpoints", "base_model", "final", "tensorboard", "__pycache__"}


class UnsafePath(ValueError):
    """A run name that would read outside the runs folder; `reason` says why without repeating the name."""

    def __init__(self, name: object, reason: str):
        super().__init__(f"refused run path {name!r}: {reason}")
        self.reason = reason


# -- runs ----------------------------------------------------------------------------------------------------


def resolve_run(root: str | Path, name: str) -> Path:
    """The directory of run `name` (relative to `root`), or UnsafePath / FileNotFoundError."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise UnsafePath(name, "not a plain relative name")
    parts = PurePosixPath(name).parts
    drive = os.name == "nt" and parts and ":" in parts[0]  # C:x; elsewhere ':' is a plain character
    if name.startswith("/") or PurePosixPath(name).is_absolute() or drive:
        raise UnsafePath(name, "absolute paths are not allowed")
    if ".." in parts:
        raise UnsafePath(name, "'..' is not allowed")
    root = Path(root).resolve()
    try:
        path = (root / name).resolve()
    except RuntimeError as e:  # Python < 3.13 raises RuntimeError for a symlink loop, not OSError
        raise UnsafePath(name, str(e)) from None
    if not path.is_relative_to(root):  # a symlink pointing out of the folder
        raise UnsafePath(name, "it leads outside the runs folder")
    if not is_run_dir(path):
        raise FileNotFoundError(f"no run {name!r} under {root} (no run's config.json)")
    return path


def find_runs(root: str | Path) -> list[str]:
    """Names of every run under `root` (directories with a run's config.json), sorted, with the runs inside a run
    (a pipeline's stages) after it; "." when `root` is a run itself. Symlinks leaving `root` are skipped."""
    root = Path(root).resolve()
    found: list[str] = []

    def walk(folder: Path, depth: int) -> None:
        if is_run_dir(folder):
            found.append(folder.relative_to(root).as_posix())
        if depth >= MAX_DEPTH:
            return
        try:
            children = sorted(folder.iterdir())
        except OSError:
            return  # unreadable folder: nothing to show there
        for child in children:
            if child.name.startswith(".") or child.name in SKIP_DIRS or not child.is_dir():
                continue
            if not child.resolve().is_relative_to(root):
                continue
            walk(child, depth + 1)

    walk(root, 0)
    return found


@dataclass(frozen=True)
class RunInfo:
    """One row of the runs table."""

    name: str
    app: str
    algorithm: str
    status: str  # running / finished / failed / crashed (its process is gone) / unknown (no status.json yet)
    step: int | None
    started: str
    updated: str | None
    error: str | None


def run_info(root: str | Path, name: str) -> RunInfo:
    run = RunDir(resolve_run(root, name))
    config = run.read_config()
    status: dict[str, Any] = run.read_status() if run.status_path.is_file() else {}
    if not isinstance(status, dict):
        raise ValueError(f"{run.status_path}: expected a JSON object, got {type(status).__name__}")
    state = status.get("status", "unknown")
    error = status.get("error")
    if state not in STATUSES:
        state = "unknown"
    elif process_gone(status):
        state = "crashed"
        error = f"process {status['pid']} ended without recording the run's end (killed?)"
    return RunInfo(
        name=name,
        app=str(config.get("app", "?")),
        algorithm=str(config.get("algorithm", "?")),
        status=state,
        step=status.get("step"),
        started=str(config.get("started", "")),
        updated=status.get("updated"),
        error=error,
    )


def with_progress(info: RunInfo, metrics: pd.DataFrame, metrics_mtime: float) -> RunInfo:
    """A running (or crashed) run's info with the step of its last metrics line and the time that file was
    last written (`metrics_mtime`, seconds since the epoch), where they are newer: a trainer rewrites
    status.json when it starts and at checkpoints only, metrics.jsonl at every step. A status step or time
    of the wrong kind (hand-edited) is replaced rather than compared."""
    if info.status not in ("running", "crashed") or metrics.empty:
        return info
    step = int(metrics["step"].max())
    if isinstance(info.step, int) and not isinstance(info.step, bool):
        step = max(step, info.step)
    written = datetime.fromtimestamp(metrics_mtime).astimezone()
    updated = written.isoformat(timespec="seconds")
    try:
        if datetime.fromisoformat(info.updated) >= written:
            updated = info.updated
    except (TypeError, ValueError):  # not a time, or one without a zone: the metrics file's time stands
        pass
    return replace(info, step=step, updated=updated)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists stay values (as JSON text so that they compare and display).

    >>> flatten({"a": 1, "b": {"c": [1, 2], "d": None}})
    {'a': 1, 'b.c': '[1, 2]', 'b.d': None}
    """
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict):
            out.update(flatten(item, name + "."))
        elif isinstance(item, list):
            out[name] = json.dumps(item)
        else:
            out[name] = item
    return out


def run_config(root: str | Path, name: str) -> dict[str, Any]:
    """config.json flattened: app, algorithm and the config fields (without the `config.` prefix)."""
    stored = RunDir(resolve_run(root, name)).read_config()
    flat = {"app": stored.get("app"), "algorithm": stored.get("algorithm")}
    flat.update(flatten(latest_config(stored) if "config" in stored else {}))
    return flat


def config_diff(configs: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Keys whose values differ between runs: one row per key, one column per run (missing: "—").

    Run-specific paths (run_dir) are left out: they always differ and say nothing.
    """
    keys = sorted(set().union(*configs.values())) if configs else []
    rows = {}
    for key in keys:
        if key == "run_dir":
            continue
        values = [config.get(key, "—") for config in configs.values()]
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            rows[key] = [str(v) for v in values]
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(configs)).rename_axis("field")


# -- metrics -------------------------------------------------------------------------------------------------


def read_metrics(path: str | Path) -> pd.DataFrame:
    """metrics.jsonl as a frame indexed by step (a half-written last line is skipped: see `cut_off_line`).

    Every value must be what `RunDir.log_metrics` writes, a finite number or null (ValueError naming the
    line and the metric otherwise): a text or a NaN would otherwise vanish from a curve without a word."""
    run = RunDir(path)
    rows = run.read_metrics(ignore_unfinished_last_line=True)
    for number, row in enumerate(rows, start=1):  # one row per line: a blank line is already an error
        where = f"{run.metrics_path}:{number}"
        _check_step(row["step"], where)
        for key, value in row.items():
            if key != "step" and value is not None and not _finite_number(value, allow_bool=True):
                raise ValueError(f"{where}: metric {key!r} must be a finite number or null, got {value!r}")
    frame = pd.DataFrame.from_records(rows)
    if frame.empty:
        return pd.DataFrame({"step": pd.Series(dtype="int64")})
    return frame.apply(pd.to_numeric).astype({"step": "int64"})


_INT64_MAX = 2**63 - 1


def _finite_number(value: object, *, allow_bool: bool = False) -> bool:
    """A JSON number a frame holds as it was written: a float that is finite, an int within int64."""
    if isinstance(value, bool):
        return allow_bool
    if isinstance(value, int):
        return abs(value) <= _INT64_MAX
    return isinstance(value, float) and math.isfinite(value)


def _check_step(step: object, where: str) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= _INT64_MAX:
        raise ValueError(f"{where}: 'step' must be an int from 0 to {_INT64_MAX}, got {step!r}")


def cut_off_line(path: str | Path) -> int | None:
    """The number of the file's last line when it has no newline (being written, or cut off by a kill)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return data.count(b"\n") + 1 if data and not data.endswith(b"\n") else None


def default_metrics(columns: list[str]) -> list[str]:
    """The curves shown first: reward, each component, zero-spread fraction, KL, entropy, clip fraction.

    >>> default_metrics(["step", "loss", "reward", "reward/a", "reward/a/failures", "kl", "zero_spread_frac"])
    ['reward', 'reward/a', 'zero_spread_frac', 'kl']
    """
    components = [c for c in columns if c.startswith("reward/") and not c.endswith("/failures")]
    kl = [c for c in columns if c == "kl" or c.startswith("kl/") or c.endswith("/kl")]
    wanted = ["reward", *components, "zero_spread_frac", *kl, "entropy", "clip/frac"]
    return [c for c in dict.fromkeys(wanted) if c in columns]


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing); NaN steps are skipped, kept NaN.

    weight 0 returns the values; 0.5 on [1, 2, 3] gives [1, 5/3, 17/7] (sum of w^k x / sum of w^k).
    >>> smooth(np.array([1.0, 2.0, 3.0]), 0.5).round(4).tolist()
    [1.0, 1.6667, 2.4286]
    """
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out = np.full(len(values), np.nan)
    last, norm = 0.0, 0.0
    for i, x in enumerate(values):
        if x is None or not math.isfinite(x):
            continue
        last = weight * last + (1 - weight) * x
        norm = weight * norm + (1 - weight)
        out[i] = last / norm
    return out


# -- rollouts ------------------------------------------------------------------------------------------------

# The columns kept in memory per rollout; the texts stay on disk. Arrow parses a large file in C++ threads;
# a row it cannot type this way (a chat-message prompt, an int example id) sends the file to plain json.
_ARROW_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("group", pa.int64()),
        ("example_id", pa.string()),
        ("prompt", pa.string()),
        ("reward", pa.float64()),
        ("advantage", pa.float64()),
        ("finish_reason", pa.string()),
    ]
)
INDEX_FIELDS = tuple(_ARROW_SCHEMA.names)
_CATEGORIES = ("example_id", "prompt", "finish_reason")
_ARROW_MIN_BYTES = 1 << 20  # below this plain json is as fast and has no start-up cost
SEARCHES_KEPT = 8  # needles whose matching lines an index keeps (an int64 per match)


class RolloutIndex:
    """rollouts.jsonl read into a few columns (INDEX_FIELDS) plus each line's byte offset; texts are read on
    demand: `rows(lines)` reads just the lines a page shows and `search` scans the raw bytes.

    `refresh()` parses only what was appended since the last call (a live run; a half-written last line waits
    for the next call), and starts over when the file shrank, was replaced or no longer holds the last
    indexed line where it was (a resume rewrites it; two rewrites can give the old inode back). One index
    is shared by all sessions of a server, hence the lock.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._identity: tuple[int, int] | None = None
        self._end = 0  # bytes indexed: every complete line before it
        self._last = b""  # the last indexed line with its newline: the file's bytes just before _end
        self._offsets = np.zeros(0, dtype=np.int64)  # (lines,) byte offset of each line's start
        self._chunks: list[pd.DataFrame] = []
        self._frame: pd.DataFrame | None = None
        self._searches: dict[str, tuple[int, np.ndarray]] = {}  # needle: (bytes scanned, matching lines)

    def refresh(self) -> "RolloutIndex":
        with self._lock:
            try:
                stat = os.stat(self.path)
            except FileNotFoundError:
                self._reset()
                return self
            identity = (stat.st_dev, stat.st_ino)
            if identity != self._identity or stat.st_size < self._end or not self._same_last_line():
                self._reset()
                self._identity = identity
            if stat.st_size > self._end:
                self._append(stat.st_size)
        return self

    def unfinished_line(self) -> int | None:
        """The number of the line after the indexed ones when the file holds more (a last line without its
        newline: being written, or cut off by a kill); None when every line is indexed."""
        with self._lock:
            try:
                size = os.stat(self.path).st_size
            except FileNotFoundError:
                return None
            return len(self._offsets) + 1 if size > self._end else None

    def _same_last_line(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(self._end - len(self._last))
            return f.read(len(self._last)) == self._last

    def _append(self, size: int) -> None:
        with open(self.path, "rb") as f:
            f.seek(self._end)
            data = f.read(size - self._end)
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written is left for the next refresh
        if not complete:
            return
        ends = np.flatnonzero(np.frombuffer(complete, dtype=np.uint8) == ord("\n"))  # (n,)
        starts = np.concatenate([[0], ends[:-1] + 1])  # (n,)
        chunk = self._parse_chunk(complete, starts, ends, first_line=len(self._offsets) + 1)
        self._offsets = np.concatenate([self._offsets, starts + self._end])
        self._chunks.append(chunk)
        self._end += len(complete)
        self._last = complete[starts[-1] :]
        self._frame = None

    def _parse_chunk(
        self, data: bytes, starts: np.ndarray, ends: np.ndarray, first_line: int
    ) -> pd.DataFrame:
        if len(data) >= _ARROW_MIN_BYTES:
            try:
                table = pa_json.read_json(
                    io.BytesIO(data),
                    parse_options=pa_json.ParseOptions(
                        explicit_schema=_ARROW_SCHEMA, unexpected_field_behavior="ignore"
                    ),
                )
            except pa.ArrowInvalid:
                table = None  # plain json below reports the bad line by number
            if table is not None and _arrow_rows_are_lines(table, len(starts)):
                return table.to_pandas()
        columns: dict[str, list] = {name: [] for name in INDEX_FIELDS}
        for k, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            row = self._parse(data[start:end], first_line + k)
            for name in INDEX_FIELDS:
                value = row.get(name)
                if name in _CATEGORIES and value is not None and not isinstance(value, str):
                    value = json.dumps(
                        value, ensure_ascii=False
                    )  # chat messages, int ids: shown as JSON text
                columns[name].append(value)
        return pd.DataFrame(
            {
                "step": np.asarray(columns["step"], dtype=np.int64),
                "group": pd.array(columns["group"], dtype="Int64"),
                **{name: pd.Series(columns[name], dtype="object") for name in _CATEGORIES},
                "reward": pd.to_numeric(pd.Series(columns["reward"], dtype="object")),
                "advantage": pd.to_numeric(pd.Series(columns["advantage"], dtype="object")),
            }
        )[list(INDEX_FIELDS)]

    def _parse(self, raw: bytes, number: int) -> dict:
        try:
            row = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.path}:{number}: malformed JSON line: {e}") from e
        where = f"{self.path}:{number}"
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{where}: expected a JSON object with an int 'step', got {raw[:80]!r}")
        _check_step(row["step"], where)
        group = row.get("group")
        if group is not None and not (isinstance(group, int) and _finite_number(group)):
            raise ValueError(f"{where}: 'group' must be an int or null, got {group!r}")
        for name in ("reward", "advantage"):
            if row.get(name) is not None and not _finite_number(row[name]):
                raise ValueError(f"{where}: {name!r} must be a finite number or null, got {row[name]!r}")
        if not isinstance(row.get("rewards") or {}, dict):
            raise ValueError(
                f"{where}: 'rewards' must be an object of reward components, got {row['rewards']!r}"
            )
        return row

    def __len__(self) -> int:
        return len(self._offsets)

    def frame(self) -> pd.DataFrame:
        """One row per rollout line (index `line`: the 0-based line number) with the INDEX_FIELDS columns."""
        with self._lock:
            if self._frame is None:
                if not self._chunks:
                    frame = pd.DataFrame({name: pd.Series(dtype="object") for name in INDEX_FIELDS})
                elif len(self._chunks) == 1:
                    frame = self._chunks[0].copy()
                else:
                    frame = pd.concat(self._chunks, ignore_index=True)
                    self._chunks = [frame]  # later refreshes concatenate one big chunk, not many
                frame["step"] = frame["step"].astype(np.int64)
                frame["group"] = frame["group"].astype("Int64")
                for name in _CATEGORIES:
                    if not isinstance(frame[name].dtype, pd.CategoricalDtype):
                        frame[name] = frame[name].astype("category")
                for name in ("reward", "advantage"):
                    frame[name] = frame[name].astype(float)
                frame.index = pd.RangeIndex(len(frame), name="line")
                self._frame = frame
            return self._frame

    def rows(self, lines: list[int] | np.ndarray) -> list[dict]:
        """The full JSON rows of these 0-based line numbers, in that order."""
        out = []
        with open(self.path, "rb") as f:
            for line in lines:
                line = int(line)
                start = int(self._offsets[line])
                end = int(self._offsets[line + 1]) if line + 1 < len(self._offsets) else self._end
                f.seek(start)
                out.append(self._parse(f.read(end - start).rstrip(b"\n"), line + 1))
        return out

    def search(self, needle: str, lines: np.ndarray | None = None) -> np.ndarray:
        """Line numbers (among `lines`, default all) whose prompt, completion or turn texts contain `needle`
        (case-insensitive for ASCII letters; other characters must match exactly).

        The matches of the last SEARCHES_KEPT needles are kept, so a rerun of the page does not read the file
        again; lines appended since are scanned on their own, and a file started over (see `refresh`) drops
        them."""
        if not needle:
            return np.arange(len(self)) if lines is None else np.asarray(lines)
        with self._lock:
            end, hits = self._searches.pop(needle, (0, np.zeros(0, dtype=np.int64)))
            if end < self._end:
                hits = np.concatenate([hits, self._scan(needle, end)])
                hits.setflags(write=False)  # shared by every caller
            self._searches[needle] = (self._end, hits)  # the most recent last
            while len(self._searches) > SEARCHES_KEPT:
                del self._searches[next(iter(self._searches))]
        return hits if lines is None else hits[np.isin(hits, lines)]

    def _scan(self, needle: str, start: int) -> np.ndarray:
        """The matching lines among those from byte `start` (a line's start) to the end indexed, in order."""
        # Find the needle as it is written inside a JSON string, then check the parsed row: the raw match
        # may be in another field (a key, the example id).
        encoded = json.dumps(needle, ensure_ascii=False)[1:-1].encode().lower()
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(self._end - start).lower()
        first = int(np.searchsorted(self._offsets, start))
        offsets = self._offsets[first:] - start  # (lines from `first`,) offsets within `data`
        found: list[int] = []
        pos = data.find(encoded)
        while pos >= 0:
            k = int(np.searchsorted(offsets, pos, side="right")) - 1
            found.append(first + k)
            pos = data.find(encoded, int(offsets[k + 1]) if k + 1 < len(offsets) else len(data))
        wanted = needle.encode().lower()  # ASCII case only, as the scan: str.lower() is not (final sigma)
        return np.asarray(
            [
                line
                for line, row in zip(found, self.rows(found), strict=True)
                if wanted in _row_text(row).encode().lower()
            ],
            dtype=np.int64,
        )


def _arrow_rows_are_lines(table: pa.Table, lines: int) -> bool:
    """Whether Arrow's rows are the file's lines as `RolloutIndex._parse` would accept them. Arrow skips
    blank lines and accepts a missing or negative step and a NaN reward; plain json then names the line."""
    step = table.column("step")
    if table.num_rows != lines or step.null_count or pc.min(step).as_py() < 0:
        return False
    return all(
        pc.all(pc.is_finite(table.column(name))).as_py() is not False for name in ("reward", "advantage")
    )


def _row_text(row: dict) -> str:
    texts = [row.get("prompt"), row.get("completion")]
    for turn in row.get("turns") or []:
        if isinstance(turn, dict):
            texts.append(turn.get("text"))
    return "\n".join(t if isinstance(t, str) else json.dumps(t, ensure_ascii=False) for t in texts if t)


def read_eval(path: str | Path) -> dict | None:
    """eval.json, or None when the run has none yet; ValueError when it is not a JSON object."""
    run = RunDir(path)
    if not run.eval_path.is_file():
        return None
    result = run.read_eval()
    if not isinstance(result, dict):
        raise ValueError(f"{run.eval_path}: expected a JSON object, got {type(result).__name__}")
    return result
