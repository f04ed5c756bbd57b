"""Atomic, durable writes of files and directories: readers (and a resume after a kill) see the old
version or the new one, never a part; temp files left by killed writers are cleaned up.
Tests: `pytest tests/core/test_runs.py`.
"""

import glob
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Write a directory whole or not at all: yields a new sibling directory to write into; when the block
    ends without error its files are synced and it is renamed to `path` (an existing `path` is moved aside
    first and removed after), on error it is removed. A kill leaves `path` as it was, and never a `path`
    with part of its files (a model whose weights file is cut short): an old `path` moved aside by a write
    cut off before the new one landed is put back, here on error and by the next call after a kill."""
    given = path = Path(path)
    if path.name in ("", ".", ".."):  # "." or "a/..": the directory it stands for, which has a name
        path = path.resolve()
    if path.exists() and not path.is_dir():  # a user's file: never moved aside and replaced by a directory
        raise FileExistsError(f"{path} is a file, not a directory")
    if path.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise ValueError(
            f"{given}: this directory is written whole, replacing it, and it holds the current directory; "
            "give a directory of its own"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    _put_back_moved_aside(path)
    _remove_killed_writers_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had this pid
    tmp.mkdir()
    try:
        yield tmp
        for entry in tmp.rglob("*"):  # files, and directories so that their entries are durable too
            if entry.is_file():
                fsync_file(entry)
            elif entry.is_dir():
                fsync_dir(entry)
        fsync_dir(tmp)
        aside = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.rename(path, aside)
        os.rename(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _put_back_moved_aside(path)
        raise


def _remove_killed_writers_temps(path: Path) -> None:
    """Delete `.<name>.tmp-<pid>`, the temp file or directory of an atomic write of `path`, where no process
    <pid> runs any more: a write cut off by a kill, only wasted disk. A running writer's is left alone."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_runs(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _put_back_moved_aside(path: Path) -> None:
    """`.<name>.old-<pid>` is an old `path` that `atomic_directory` moved aside: put it back when no new
    `path` landed after it, else delete it. Another running writer's is left alone: it sits between its
    two renames and its new `path` is about to land."""
    for aside in sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*")):
        pid = aside.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and _process_runs(int(pid)):
            continue
        if path.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(aside, path)


def write_json_atomic(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, ensure_ascii=False, allow_nan=False, indent=2).encode() + b"\n")


def write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a mix: temp file in the same dir, fsync, replace."""
    _remove_killed_writers_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_durably(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    # Makes a rename durable; directories cannot be opened for fsync on Windows.
    if os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
