"""De-bias page: bias scores per category before and after training (lower is fairer), and the most and
least fair responses, from eval.json's `bias` and `responses` (docs/dashboards.md)."""

import pandas as pd
import streamlit as st

from dashboards import state
from dashboards.plots import Plot

APPS = ("debias", "de-bias", "debiasing")


def bias_table(result: dict) -> pd.DataFrame:
    """category, stage (before / after), bias; a `bias` or category that is not an object, or a score that is
    not a number, is skipped."""
    bias = result.get("bias")
    rows = [
        {"category": category, "stage": stage, "bias": state.number(scores[stage])}
        for category, scores in (bias.items() if isinstance(bias, dict) else [])
        if isinstance(scores, dict)
        for stage in ("before", "after")
        if state.number(scores.get(stage)) is not None
    ]
    return pd.DataFrame(rows, columns=["category", "stage", "bias"])


def responses_table(result: dict) -> pd.DataFrame:
    frame = pd.DataFrame(state.objects(result.get("responses")))
    for column in ("category", "stage", "prompt", "response", "bias"):
        if column not in frame:
            frame[column] = None
    frame["bias"] = pd.Series([state.number(b) for b in frame["bias"]], index=frame.index, dtype="float64")
    return frame[["category", "stage", "bias", "prompt", "response"]]


def render() -> None:
    st.title("De-bias")
    names = state.require_runs(APPS)
    run = state.pick_run(names, key="debias_run")
    try:
        result = state.eval_results(run)
    except (OSError, ValueError) as e:
        state.show_error(f"Cannot read {run}:", e)
        return
    if not result:
        st.info(f"{run} has no eval.json yet.")
        return
    scores = bias_table(result)
    st.subheader("Bias per category (lower is fairer)")
    if scores.empty:
        st.info("No `bias` scores in eval.json.")
    else:
        state.show_plot(
            Plot("bar", scores, x="category", y="bias", color="stage"),
            state.file_name("bias", run),
            key="debias_png",
        )
        wide = scores.pivot(index="category", columns="stage", values="bias")
        if {"before", "after"} <= set(wide.columns):
            wide["change"] = wide["after"] - wide["before"]
        state.show_table(wide, state.file_name("bias", run), key="debias_csv")

    st.subheader("Responses")
    responses = responses_table(result)
    if responses.empty:
        st.info(
            f"No `responses` in {run}'s eval.json: `debias eval` writes them (a `debias pipeline` run keeps "
            "them in the eval.json of each of its `grpo-seed<k>` runs)."
        )
        return
    if responses["bias"].isna().all():
        st.info(f"The `responses` in {run}'s eval.json have no `bias` values to rank them by.")
        return
    categories = ["(all)", *sorted(responses["category"].dropna().astype(str).unique())]
    stages = ["(all)", *sorted(responses["stage"].dropna().astype(str).unique())]
    left, middle, right = st.columns(3)
    category = left.selectbox("Category", categories, key="debias_category")
    stage = middle.selectbox("Stage", stages, key="debias_stage")
    k = right.number_input("How many", 1, 50, 5, key="debias_k")
    shown = responses.dropna(subset=["bias"])
    if category != "(all)":
        shown = shown[shown["category"].astype(str) == category]
    if stage != "(all)":
        shown = shown[shown["stage"].astype(str) == stage]
    ordered = shown.sort_values("bias", kind="stable")
    for title, part, key in (
        ("Most fair", ordered.head(k), "debias_fair_csv"),
        ("Least fair", ordered.iloc[::-1].head(k), "debias_unfair_csv"),
    ):
        st.markdown(f"**{title}**")
        state.show_table(part, state.file_name(title.lower().replace(" ", "-"), run), key=key, index=False)
