"""TCM page: accuracy per question type of the selected TCM runs, from eval.json's `accuracy_by_type`
(and `count_by_type` when present; docs/dashboards.md)."""

import pandas as pd
import streamlit as st

from dashboards import state
from dashboards.plots import Plot

APPS = ("tcm",)


def accuracy_rows(results: dict[str, dict]) -> pd.DataFrame:
    """run, type, accuracy, count (None when not given)."""
    rows = []
    for run, result in results.items():
        accuracy, counts = result.get("accuracy_by_type"), result.get("count_by_type")
        if not isinstance(accuracy, dict):
            continue  # absent, or not {type: accuracy}
        for kind, value in accuracy.items():
            if state.number(value) is None:
                continue  # no accuracy for this type (a NaN is written as null)
            count = counts.get(kind) if isinstance(counts, dict) else None
            rows.append({"run": run, "type": kind, "accuracy": state.number(value), "count": count})
    return pd.DataFrame(rows, columns=["run", "type", "accuracy", "count"])


def render() -> None:
    st.title("TCM: accuracy per question type")
    names = state.require_runs(APPS)
    chosen = state.pick_runs(names, key="tcm_runs")
    results = state.readable_eval_results(chosen)
    rows = accuracy_rows(results)
    if rows.empty:
        st.info("No `accuracy_by_type` in the selected runs' eval.json.")
        return
    plot = Plot("bar", rows, x="type", y="accuracy", color="run" if len(chosen) > 1 else None)
    state.show_plot(plot, state.file_name("tcm-accuracy", *chosen), key="tcm_png")
    wide = rows.pivot(index="type", columns="run", values="accuracy")
    counts = rows.pivot(index="type", columns="run", values="count")
    for (
        run
    ) in counts.columns:  # each run's questions per type beside its accuracies, where eval.json has them
        if counts[run].notna().any():
            wide[f"{run} n"] = counts[run]
    state.show_table(wide, state.file_name("tcm-accuracy", *chosen), key="tcm_csv")
