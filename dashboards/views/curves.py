"""Training curves page: any metric of metrics.jsonl over steps, several runs overlaid, with smoothing.

The curves shown first are the reward, each reward component, the zero-spread-group fraction, KL (when the
run logs it), entropy and the clip fraction.
"""

import numpy as np
import pandas as pd
import streamlit as st

from dashboards import loading, state
from dashboards.plots import Plot


def tidy_curves(frames: dict[str, pd.DataFrame], metrics: list[str], weight: float) -> pd.DataFrame:
    """One row per (run, metric, step): the raw value and its smoothed value."""
    parts = []
    for run, frame in frames.items():
        for metric in metrics:
            if metric not in frame:
                continue
            raw = frame[metric].to_numpy(dtype=float)
            parts.append(
                pd.DataFrame(
                    {
                        "run": run,
                        "metric": metric,
                        "step": frame["step"].to_numpy(),
                        "raw": raw,
                        "value": loading.smooth(raw, weight),
                    }
                )
            )
    if not parts:
        return pd.DataFrame(columns=["run", "metric", "step", "raw", "value"])
    out = pd.concat(parts, ignore_index=True)
    return out[np.isfinite(out["value"])]


def render() -> None:
    st.title("Training curves")
    names = state.require_runs()
    chosen = state.pick_runs(names, key="curves_runs")
    if not chosen:
        st.info("Pick one or more runs.")
        return
    frames = {}
    for name in chosen:  # a run whose metrics.jsonl cannot be read is named; the others are still drawn
        try:
            frames[name] = state.metrics(name)
        except (OSError, ValueError) as e:
            state.show_error(f"Cannot read the metrics of {name}:", e)
    columns = sorted({c for frame in frames.values() for c in frame.columns} - {"step"})
    if not columns:
        if frames:  # else every run's error is shown
            st.info("The selected runs have logged no metrics yet.")
        return
    metrics = st.multiselect(
        "Metrics", columns, default=loading.default_metrics(columns), key="curves_metrics"
    )
    weight = st.slider(
        "Smoothing (exponential moving average weight)", 0.0, 0.99, 0.0, 0.01, key="curves_smoothing"
    )
    if not metrics:
        return
    data = tidy_curves(frames, metrics, weight)
    if data.empty:
        st.info("No finite values for these metrics.")
        return
    title = "smoothed" if weight else ""
    color = "run" if len(chosen) > 1 else None
    plot = Plot("line", data, x="step", y="value", color=color, facet="metric", title=title)
    state.show_plot(plot, state.file_name("curves", *chosen), key="curves_png")
    with st.expander("Data"):
        state.show_table(data, state.file_name("curves", *chosen), key="curves_csv", index=False)
