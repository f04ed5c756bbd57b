"""Public-goods page: lattice snapshots (cooperators and defectors) and cooperation-vs-r curves of several
runs overlaid, from eval.json's `snapshots` and `cooperation_vs_r` (docs/dashboards.md)."""

import numpy as np
import pandas as pd
import streamlit as st

from dashboards import state
from dashboards.plots import Plot

APPS = ("public-goods", "public_goods", "pgg")
PALETTE = {"cooperator": "#2b83ba", "defector": "#d7191c"}


def lattice_cells(grid: object) -> pd.DataFrame:
    """One row per site: row, col, strategy (1 = cooperator, 0 = defector)."""
    if not isinstance(grid, list):
        raise ValueError(f"public goods snapshot: grid must be a list of rows, got {type(grid).__name__}")
    array = np.asarray(grid, dtype=np.int64)
    if array.ndim != 2:
        raise ValueError(f"public goods snapshot: grid must be a list of rows, got {array.ndim} dimensions")
    rows, cols = np.indices(array.shape)
    return pd.DataFrame(
        {
            "row": rows.ravel(),
            "col": cols.ravel(),
            "strategy": np.where(array.ravel() == 1, "cooperator", "defector"),
        }
    )


def cooperation_curves(results: dict[str, dict]) -> pd.DataFrame:
    """run, label, r, cooperation from each run's `cooperation_vs_r`. A sweep's points are labelled
    "run · label" (or run); the point of a `public-goods run` (its eval.json has `final_cooperation`) by its
    label alone (the method), so that runs at several r join into one curve per method. A point without a
    numeric r and cooperation is left out, as other eval.json entries of the wrong kind are."""
    rows = []
    for run, result in results.items():
        single_run = "final_cooperation" in result
        for point in state.objects(result.get("cooperation_vs_r")):
            if state.number(point.get("r")) is None or state.number(point.get("cooperation")) is None:
                continue
            if single_run and point.get("label"):
                label = point["label"]
            else:
                label = f"{run} · {point['label']}" if point.get("label") else run
            rows.append(
                {
                    "run": run,
                    "label": label,
                    "r": float(point["r"]),
                    "cooperation": float(point["cooperation"]),
                }
            )
    return pd.DataFrame(rows, columns=["run", "label", "r", "cooperation"]).sort_values(["label", "r"])


def render() -> None:
    st.title("Public goods")
    names = state.require_runs(APPS)
    chosen = state.pick_runs(names, key="pgg_runs")
    results = state.readable_eval_results(chosen)
    missing = [name for name, result in results.items() if not result]
    if missing:
        st.caption("No eval.json yet: " + ", ".join(missing))

    curves = cooperation_curves(results)
    st.subheader("Cooperation vs r")
    if curves.empty:
        st.info("No `cooperation_vs_r` in the selected runs' eval.json.")
    else:
        plot = Plot("line", curves, x="r", y="cooperation", color="label")
        state.show_plot(plot, state.file_name("cooperation-vs-r", *chosen), key="pgg_curve_png")
        state.show_table(
            curves, state.file_name("cooperation-vs-r", *chosen), key="pgg_curve_csv", index=False
        )

    st.subheader("Lattice snapshots")
    with_snapshots = [name for name, result in results.items() if state.objects(result.get("snapshots"))]
    if not with_snapshots:
        st.info("No `snapshots` in the selected runs' eval.json.")
        return
    run = st.selectbox("Run", with_snapshots, key="pgg_snapshot_run")
    snapshots = state.objects(results[run]["snapshots"])
    labels = [f"step {s.get('step', '?')} · r {s.get('r', '?')}" for s in snapshots]
    k = (
        0
        if len(snapshots) == 1
        else st.select_slider(
            "Snapshot",
            range(len(snapshots)),
            value=len(snapshots) - 1,
            format_func=lambda i: labels[i],
            key="pgg_snapshot",
        )
    )
    try:
        cells = lattice_cells(snapshots[k].get("grid"))
    except ValueError as e:
        state.show_error(f"Cannot draw the snapshot {labels[k]} of {run}:", e)
        return
    st.metric("Cooperators", f"{(cells['strategy'] == 'cooperator').mean():.1%}")
    plot = Plot("grid", cells, x="col", y="row", color="strategy", palette=PALETTE, title=labels[k])
    state.show_plot(plot, state.file_name("lattice", run, str(k)), key="pgg_lattice_png")
