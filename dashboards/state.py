"""What every dashboard page shares: the runs folder, cached readers, run pickers bound to the URL's `run`
query parameters (unsafe ones refused), and CSV / PNG export buttons.

The runs folder comes from the environment variable GRPO_SUITE_RUNS, which `grpo-suite dashboard serve
--runs DIR` sets (default: ./runs).
"""

import math
import os
from datetime import datetime
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboards import loading
from dashboards.plots import Plot

RUNS_ENV = "GRPO_SUITE_RUNS"


def runs_root() -> Path:
    root = Path(os.environ.get(RUNS_ENV, "runs")).resolve()
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "does not exist"
        st.error(f"The runs folder {root} {problem}: start the dashboard with --runs DIR.")
        st.stop()
    return root


@st.cache_data(ttl=5, show_spinner=False)
def run_names(root: str) -> list[str]:
    return loading.find_runs(root)


def run_info(name: str) -> loading.RunInfo:
    return loading.run_info(runs_root(), name)


def run_progress(name: str, warn: bool = True) -> tuple[loading.RunInfo, pd.DataFrame]:
    """The run's info, with a running run's step and update time from its metrics (`loading.with_progress`),
    and its metrics (`warn`: as `metrics`)."""
    info, frame = run_info(name), metrics(name, warn)
    mtime = _signature(run_path(name) / "metrics.jsonl")[0] / 1e9
    return loading.with_progress(info, frame, mtime), frame


def _readable_info(name: str) -> loading.RunInfo | None:
    """The run's info, or None when its files cannot be read (damaged, or deleted since it was listed)."""
    try:
        return run_info(name)
    except (OSError, ValueError):
        return None


def run_path(name: str) -> Path:
    return loading.resolve_run(runs_root(), name)


def _signature(path: Path) -> tuple[int, int]:
    """(mtime in ns, size) of a file, or (0, 0): cached readers are keyed on it to see new lines."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return 0, 0
    return stat.st_mtime_ns, stat.st_size


@st.cache_data(max_entries=1024, show_spinner=False)  # the Runs table reads every run's metrics per rerun
def _metrics(path: str, signature: tuple[int, int]) -> tuple[pd.DataFrame, int | None]:
    return loading.read_metrics(path), loading.cut_off_line(Path(path) / "metrics.jsonl")


def metrics(name: str, warn: bool = True) -> pd.DataFrame:
    """The run's metrics; a last line without its newline is left out, with a warning unless the run is
    still running (then its writer may be mid-line) or not `warn` (a page reading them again)."""
    path = run_path(name)
    frame, cut_off = _metrics(str(path), _signature(path / "metrics.jsonl"))
    if warn:
        _warn_cut_off(name, path / "metrics.jsonl", cut_off)
    return frame


def _warn_cut_off(name: str, path: Path, line: int | None) -> None:
    """A warning that `path`'s last line, `line`, is left out, unless the run is still writing it."""
    if line is not None and run_info(name).status != "running":
        st.warning(
            f"`{path}`: line {line} has no newline (cut off by a killed process) and is left out (a resumed "
            "run rewrites it)."
        )


@st.cache_resource(max_entries=16, show_spinner=False)
def _rollout_index(path: str) -> loading.RolloutIndex:
    return loading.RolloutIndex(path)


def rollouts(name: str) -> loading.RolloutIndex:
    """The run's rollout index, brought up to date (only new lines are parsed); a last line without its
    newline is left out, with a warning unless the run is still running."""
    path = run_path(name) / "rollouts.jsonl"
    index = _rollout_index(str(path)).refresh()
    _warn_cut_off(name, path, index.unfinished_line())
    return index


def eval_results(name: str) -> dict | None:
    return loading.read_eval(run_path(name))


def readable_eval_results(names: list[str]) -> dict[str, dict]:
    """{run: its eval.json, {} when it has none} of the runs whose eval.json can be read; each other run is
    named on the page with its error."""
    results = {}
    for name in names:
        try:
            results[name] = eval_results(name) or {}
        except (OSError, ValueError) as e:
            show_error(f"Cannot read {name}:", e)
    return results


def objects(value: object) -> list[dict]:
    """The objects of a list read from eval.json; anything else (not a list, an item not an object) is left
    out."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def number(value: object) -> float | None:
    """A number read from eval.json as a float; None for null (a NaN the writer stored), a bool, text or
    anything else, so that a page leaves it out."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


# -- picking runs --------------------------------------------------------------------------------------------


def _query_runs(names: list[str]) -> list[str]:
    """The runs named by `?run=` in the URL; unsafe or unknown names are reported and dropped."""
    chosen = []
    for name in st.query_params.get_all("run"):
        try:
            loading.resolve_run(runs_root(), name)
        except loading.UnsafePath as e:
            st.error(f"Refused the run path in the URL: {e.reason}.")
            st.code(name, language=None)  # the offending text shown as text, never as markdown
            continue
        except FileNotFoundError:
            st.warning("The URL names a run that does not exist:")
            st.code(name, language=None)
            continue
        if name in names:
            chosen.append(name)
    return chosen


def _instant(iso_time: str) -> float:
    """Seconds since the epoch of an ISO time (one without a zone is local), so runs written under two zone
    offsets compare by when they started, not as text; -inf when it is not a time."""
    try:
        return datetime.fromisoformat(iso_time).timestamp()
    except ValueError:
        return -math.inf


def newest(names: list[str]) -> str:
    """The run started last (config.json `started`, to the second; ties: the outer run, as a `train` that
    built its own SFT stage inside its run within the same second, then the last name); a run whose files
    cannot be read only when no other run can be."""

    def key(name: str) -> tuple:
        info = _readable_info(name)
        return info is not None, _instant(info.started) if info else -math.inf, -name.count("/"), name

    return max(names, key=key)


def pick_runs(names: list[str], *, key: str, label: str = "Runs") -> list[str]:
    """A multiselect of runs, starting from the URL's `run` parameters (else the newest); the URL follows."""
    default = _query_runs(names) or [newest(names)]
    chosen = st.multiselect(label, names, default=default, key=key)
    st.query_params["run"] = chosen
    return chosen


def pick_run(names: list[str], *, key: str, label: str = "Run") -> str | None:
    """One run, starting from the URL's first `run` parameter (else the newest); the URL follows."""
    if not names:
        return None
    default = (_query_runs(names) or [newest(names)])[0]
    chosen = st.selectbox(label, names, index=names.index(default), key=key)
    st.query_params["run"] = chosen
    return chosen


def require_runs(apps: tuple[str, ...] | None = None) -> list[str]:
    """Names of the runs (of these apps, when given: runs whose files cannot be read are left out); stops the
    page with a note when there are none."""
    names = run_names(str(runs_root()))
    if apps is not None:
        names = [name for name in names if (info := _readable_info(name)) and info.app in apps]
    if not names:
        which = f" of app {' / '.join(apps)}" if apps else ""
        st.info(f"No runs{which} under {runs_root()} yet.")
        st.stop()
    return names


# -- export --------------------------------------------------------------------------------------------------


def csv_bytes(frame: pd.DataFrame, *, index: bool = True) -> bytes:
    """The table as UTF-8 CSV with a byte-order mark: without one, Excel reads the file in the locale's code
    page and garbles Chinese text (TCM answers); pandas, and csv readers opened with utf-8-sig, drop it."""
    return frame.to_csv(index=index).encode("utf-8-sig")


def download_csv(frame: pd.DataFrame, name: str, *, key: str, index: bool = True) -> None:
    st.download_button(
        "Download CSV",
        data=lambda: csv_bytes(frame, index=index),
        file_name=f"{name}.csv",
        mime="text/csv",
        key=key,
        on_click="ignore",
    )


def show_plot(plot: Plot, name: str, *, key: str) -> None:
    """The plot on the page, with a PNG download drawn only when asked for."""
    st.altair_chart(plot.chart(), width="stretch" if plot.kind != "grid" else "content")
    st.download_button(
        "Download PNG", data=plot.png, file_name=f"{name}.png", mime="image/png", key=key, on_click="ignore"
    )


def show_error(message: str, error: Exception) -> None:
    """An error on the page: the message, then the exception's text as text (it may quote model output)."""
    st.error(message)
    st.code(str(error), language=None)


def show_table(frame: pd.DataFrame, name: str, *, key: str, index: bool = True, **kwargs) -> None:
    st.dataframe(frame, hide_index=not index, **kwargs)
    download_csv(frame, name, key=key, index=index)


def file_name(*parts: str) -> str:
    """A download file name from run names and words: path separators and odd characters become '_'."""
    text = "-".join(parts)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:120] or "export"
