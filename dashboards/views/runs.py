"""Runs page: every run under the folder (app, algorithm, status, step, last reward), the config diff of
the selected runs, their eval.json, and a live view of the running ones that refreshes by itself."""

import json
from datetime import timedelta

import pandas as pd
import streamlit as st

from dashboards import loading, state
from dashboards.plots import Plot


def runs_table(names: list[str]) -> pd.DataFrame:
    """One row per run; a run whose files cannot be read keeps its row, with the reason under `error`."""
    rows = []
    for name in names:
        row = {"run": name, "app": None, "algorithm": None, "status": "unknown", "step": None}
        row |= {"reward (last step)": None, "started": None, "updated": None, "error": None}
        try:
            info = state.run_info(name)
            row |= {"app": info.app, "algorithm": info.algorithm, "status": info.status, "step": info.step}
            row |= {"started": info.started, "updated": info.updated}
            info, frame = state.run_progress(name)  # a running run's step from its metrics
            row |= {"step": info.step, "updated": info.updated}
            reward = frame.iloc[-1].get("reward") if len(frame) else None
            row["reward (last step)"] = None if reward is None or pd.isna(reward) else float(reward)
        except (OSError, ValueError) as e:
            row["error"] = str(e)
        rows.append(row)
    return pd.DataFrame(rows)


def _live(name: str) -> None:
    """The status line and reward curve of a running run; an error when its files cannot be read (it may
    have been deleted since the page was drawn)."""
    try:
        info = state.run_info(name)
    except (OSError, ValueError) as e:
        state.show_error(f"Cannot read {name}:", e)
        return
    try:
        info, frame = state.run_progress(name)
    except (OSError, ValueError) as e:
        st.caption(f"{name} · {info.status} · step {info.step} · updated {info.updated}")
        state.show_error(f"Cannot read the metrics of {name}:", e)
        return
    st.caption(f"{name} · {info.status} · step {info.step} · updated {info.updated}")
    if "reward" in frame and frame["reward"].notna().any():
        data = frame[["step", "reward"]].dropna()
        plot = Plot("line", data, x="step", y="reward")
        state.show_plot(plot, state.file_name("live", name), key=f"runs_live_png_{name}")


def render() -> None:
    st.title("Runs")
    root = state.runs_root()
    names = state.require_runs()
    st.caption(f"{len(names)} runs under {root}")
    table = runs_table(names)
    statuses = st.multiselect(
        "Status",
        ["running", "finished", "failed", "crashed", "unknown"],
        default=["running", "finished", "failed", "crashed", "unknown"],
        key="runs_status",
    )
    state.show_table(table[table["status"].isin(statuses)], "runs", key="runs_csv", index=False)

    chosen = state.pick_runs(names, key="runs_pick", label="Selected runs (compare their configs)")
    if not chosen:
        return
    configs = {}
    for name in chosen:  # a run deleted since it was listed is named and skipped
        try:
            configs[name] = loading.run_config(root, name)
        except (OSError, ValueError) as e:
            state.show_error(f"Cannot read {name}:", e)
    chosen = list(configs)
    if len(chosen) > 1:
        st.subheader("Config diff")
        diff = loading.config_diff(configs)
        if diff.empty:
            st.info("The selected runs have the same config.")
        else:
            state.show_table(diff, state.file_name("config-diff", *chosen), key="runs_diff_csv")
    elif chosen:
        st.subheader("Config")
        config = pd.DataFrame(
            {"value": [str(v) for v in configs[chosen[0]].values()]},
            index=pd.Index(list(configs[chosen[0]]), name="field"),
        )
        state.show_table(config, state.file_name("config", chosen[0]), key="runs_config_csv")

    running = []
    for name in chosen:  # a run whose files cannot be read is named; the others are still shown
        try:
            info = state.run_info(name)
        except (OSError, ValueError) as e:
            state.show_error(f"Cannot read {name}:", e)
            continue
        if info.status == "running":
            running.append(name)
        if info.status == "failed" and info.error:
            st.error(f"{name} failed at step {info.step}:")
            st.code(info.error, language=None)
        if info.status == "crashed":
            try:  # its last logged step, as the table shows it (status.json's is its last checkpoint's)
                info = state.run_progress(name, warn=False)[0]  # the table has warned of a cut-off line
            except (OSError, ValueError):  # its metrics cannot be read: the table names why
                pass
            st.warning(f"{name} stopped at step {info.step}: {info.error}")
        try:
            results = state.eval_results(name)
        except (OSError, ValueError) as e:
            state.show_error(f"Cannot read the eval.json of {name}:", e)
            continue
        if results is not None:
            with st.expander(f"eval.json of {name}"):
                flat = loading.flatten(results)
                frame = pd.DataFrame(
                    {"value": [json.dumps(v) if not isinstance(v, str) else v for v in flat.values()]},
                    index=pd.Index(list(flat), name="key"),
                )
                state.show_table(frame, state.file_name("eval", name), key=f"runs_eval_{name}")

    if running:
        st.subheader("Live")
        every = st.number_input("Refresh every (seconds)", 1, 300, 5, key="runs_refresh")
        live = st.toggle("Live refresh", value=True, key="runs_live")

        @st.fragment(run_every=timedelta(seconds=every) if live else None)
        def live_view() -> None:
            for name in running:
                _live(name)

        live_view()
