"""Math page: pass@k per benchmark of every math run, and the same averaged by algorithm (the large model's
runs apart), from eval.json's `pass_at_k` (docs/dashboards.md)."""

import pandas as pd
import streamlit as st

from dashboards import loading, state
from dashboards.plots import Plot

APPS = ("math", "math_reasoning", "math-reasoning")


def arm(algorithm: str, config: dict) -> str:
    """What runs are averaged by: the algorithm, marked "(large)" for a run whose policy is the large model
    (`--size large`, and `math compare`'s grpo_large arm): not the small model's runs of that algorithm.

    >>> arm("grpo", {"size": "large"}), arm("grpo", {"size": "small"}), arm("grpo", {})
    ('grpo (large)', 'grpo', 'grpo')
    """
    return f"{algorithm} (large)" if config.get("size") == "large" else algorithm


def pass_at_k_rows(results: dict[str, tuple[str, dict]]) -> pd.DataFrame:
    """run, algorithm, benchmark, k, pass from {run: (algorithm, eval.json)}."""
    rows = []
    for run, (algorithm, result) in results.items():
        by_benchmark = result.get("pass_at_k")
        for benchmark, by_k in by_benchmark.items() if isinstance(by_benchmark, dict) else ():
            if not isinstance(by_k, dict):
                continue  # not {k: pass}
            for k, value in by_k.items():
                if not str(k).isdecimal() or state.number(value) is None:
                    continue  # not k: pass (a NaN is written as null)
                rows.append(
                    {
                        "run": run,
                        "algorithm": algorithm,
                        "benchmark": benchmark,
                        "k": int(k),
                        "pass": state.number(value),
                    }
                )
    return pd.DataFrame(rows, columns=["run", "algorithm", "benchmark", "k", "pass"])


def by_algorithm(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean pass@k over the runs of each (algorithm, benchmark): columns pass@1, pass@8, ... and runs;
    where runs were evaluated at different k, also runs@1, runs@8, ...: the runs behind each mean."""
    keys = ["algorithm", "benchmark"]
    mean = rows.pivot_table(index=keys, columns="k", values="pass", aggfunc="mean")
    counts = rows.pivot_table(index=keys, columns="k", values="run", aggfunc="nunique", fill_value=0)
    mean.columns = [f"pass@{k}" for k in mean.columns]
    mean["runs"] = rows.groupby(keys)["run"].nunique()
    if (counts.to_numpy() != mean[["runs"]].to_numpy()).any():
        for k in counts.columns:
            mean[f"runs@{k}"] = counts[k]
    return mean


def render() -> None:
    st.title("Math: pass@k")
    names = state.require_runs(APPS)
    results = {}
    for name in names:  # a run whose files cannot be read is named; the others are still shown
        try:
            result = state.eval_results(name)
            if result and result.get("pass_at_k"):
                config = loading.run_config(state.runs_root(), name)
                results[name] = (arm(state.run_info(name).algorithm, config), result)
        except (OSError, ValueError) as e:
            state.show_error(f"Cannot read {name}:", e)
    rows = pass_at_k_rows(results)
    if rows.empty:
        st.info("No math run has `pass_at_k` in its eval.json yet.")
        return
    st.subheader("By algorithm (mean over runs; the large model's apart)")
    table = by_algorithm(rows)
    state.show_table(table, "pass-at-k-by-algorithm", key="math_algo_csv")
    curve = rows.groupby(["algorithm", "benchmark", "k"], as_index=False)["pass"].mean()
    state.show_plot(
        Plot("line", curve, x="k", y="pass", color="algorithm", facet="benchmark"),
        "pass-at-k",
        key="math_png",
    )
    st.subheader("Per run")
    per_run = rows.pivot_table(index=["run", "algorithm", "benchmark"], columns="k", values="pass")
    per_run.columns = [f"pass@{k}" for k in per_run.columns]
    state.show_table(per_run, "pass-at-k-per-run", key="math_run_csv")
