"""Rollouts explorer: filter a run's rollouts by step, prompt, reward range and text, page through them, and
open a prompt's whole group side by side (each completion with its reward components and advantage; for
multi-turn rollouts the turns, observations marked).

Only the page shown is read from disk (see `loading.RolloutIndex`); model text is shown with st.code /
st.dataframe, never as markdown or HTML.
"""

import itertools
import math
import os
import re

import numpy as np
import pandas as pd
import streamlit as st

from dashboards import state
from dashboards.loading import RolloutIndex

PAGE_SIZES = (25, 50, 100, 200)
MAX_PROMPT_CHOICES = 2000  # beyond this a select box is useless and slow: narrow the steps first


def _short(text: object, width: int = 80) -> str:
    text = str(text).replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def prompt_labels(prompts: list[str], width: int = 80) -> dict[str, str]:
    """A distinct label of at most about `width` characters per prompt, for the prompt picker: what follows
    the words all prompts share (a chat template's system prompt), or, where a prompt shares more than half
    a label with another (a long common question stem), the words just before the two differ; numbered
    where two still read the same. The picker keeps a choice by its label, so two equal labels would show
    the last one's rollouts.

    >>> prompt_labels(["System: be brief.\nQ: 1+1", "System: be brief.\nQ: 2+2"])
    {'System: be brief.\nQ: 1+1': '…Q: 1+1', 'System: be brief.\nQ: 2+2': '…Q: 2+2'}
    """
    shared = os.path.commonprefix(prompts) if len(prompts) > 1 else ""
    cut = _word_start(shared, len(shared))
    ordered = sorted(prompts)
    near = dict.fromkeys(prompts, 0)  # the longest prefix a prompt shares with another: with a neighbour
    for a, b in itertools.pairwise(ordered):
        common = len(os.path.commonprefix([a, b]))
        near[a], near[b] = max(near[a], common), max(near[b], common)
    labels: dict[str, str] = {}
    used: set[str] = set()
    for prompt in prompts:
        start = cut
        if near[prompt] - cut > width // 2:  # the difference would fall past the label's end
            start = max(cut, _word_start(prompt, near[prompt] - width // 4))
        label = short = ("…" if start else "") + _short(prompt[start:], width)
        number = 1
        while label in used:
            number += 1
            label = f"{short} ({number})"
        labels[prompt] = label
        used.add(label)
    return labels


def _word_start(text: str, end: int) -> int:
    """Where the word ends that is last before `end` in `text` (after its spaces); 0 when there is none."""
    return max((m.end() for m in re.finditer(r"\s+", text[:end])), default=0)


def filter_lines(
    frame: pd.DataFrame, steps: tuple[int, int], prompt: str | None, rewards: tuple[float, float] | None
) -> np.ndarray:
    """Line numbers of the rollouts within the step range, of this prompt, with reward in range."""
    mask = (frame["step"] >= steps[0]) & (frame["step"] <= steps[1])
    if prompt is not None:
        mask &= frame["prompt"] == prompt
    if rewards is not None:
        mask &= frame["reward"].between(rewards[0], rewards[1])
    return frame.index[mask.to_numpy()].to_numpy()


def page_table(index: RolloutIndex, lines: np.ndarray) -> pd.DataFrame:
    """The rows of a page with their texts, one column per reward component."""
    records = []
    for line, row in zip(lines, index.rows(lines), strict=True):
        record = {
            "line": int(line),
            "step": row.get("step"),
            "group": row.get("group"),
            "prompt": _text(row.get("prompt")),
            "completion": _text(row.get("completion")),
            "reward": row.get("reward"),
            "advantage": row.get("advantage"),
        }
        for name, value in (row.get("rewards") or {}).items():
            record[f"r:{name}"] = value
        record["finish_reason"] = row.get("finish_reason")
        records.append(record)
    return pd.DataFrame.from_records(records)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def group_lines(frame: pd.DataFrame, line: int) -> np.ndarray:
    """Every rollout of the same group as `line`: same step and group (or same prompt without groups)."""
    row = frame.loc[line]
    same = frame["step"] == row["step"]
    if pd.notna(row["group"]):
        same &= frame["group"] == row["group"]
    elif pd.notna(row["prompt"]):
        same &= frame["prompt"] == row["prompt"]
    else:  # neither: the rows of the step without a prompt (NaN == NaN would match none, not even `line`)
        same &= frame["prompt"].isna()
    return frame.index[same.to_numpy()].to_numpy()


def show_rollout(row: dict, column, run: str, line: int) -> None:
    """Rollout `line` of `run` in `column`: reward, advantage, reward components (with CSV) and text."""
    reward, advantage = row.get("reward"), row.get("advantage")
    column.markdown(f"**reward** `{_num(reward)}` · **advantage** `{_num(advantage)}`")
    components = row.get("rewards") or {}
    if components:
        table = pd.DataFrame({"component": list(components), "value": list(components.values())})
        with column:
            name = state.file_name("rewards", run, str(line))
            state.show_table(table, name, key=f"ro_rewards_csv_{line}", index=False)
    turns = row.get("turns")
    if isinstance(turns, list) and turns:
        for k, turn in enumerate(turns):
            turn = turn if isinstance(turn, dict) else {"role": "model", "text": turn}
            role = turn.get("role", "model")
            label = "observation (environment)" if role == "observation" else f"{role} turn"
            column.caption(f"{k + 1}. {label}")
            column.code(_text(turn.get("text")), language=None, wrap_lines=True)
    else:
        column.code(_text(row.get("completion")), language=None, wrap_lines=True)
    if row.get("finish_reason"):
        column.text(f"finish: {row['finish_reason']}")


def _num(value: object) -> str:
    return f"{value:+.4f}" if isinstance(value, int | float) else "—"


def range_slider(column, label: str, low, high, *, key: str) -> tuple:
    """A range slider over [low, high] that keeps a narrowed range when the bounds move (a running run
    logs a step; another run is picked), clamped to them: a streamlit slider whose bounds change starts
    again from its default. The whole range, or a range left empty by the clamp, follows the bounds."""
    kept = st.session_state.get(f"{key}_kept")
    start, end = (max(kept[0], low), min(kept[1], high)) if kept else (low, high)
    if start > end:
        start, end = low, high
    picked = column.slider(label, low, high, (start, end), key=key)
    st.session_state[f"{key}_kept"] = None if picked == (low, high) else picked
    return picked


def render() -> None:
    st.title("Rollouts")
    names = state.require_runs()
    run = state.pick_run(names, key="rollouts_run")
    try:
        index = state.rollouts(run)
    except (OSError, ValueError) as e:
        state.show_error(f"Cannot read the rollouts of {run}:", e)
        return
    if not len(index):
        st.info(f"{run} has logged no rollouts yet.")
        return
    try:  # the texts are read only as shown: a line's `rewards` is checked then
        explore(index, run)
    except (OSError, ValueError) as e:
        state.show_error(f"Cannot read the rollouts of {run}:", e)


def explore(index: RolloutIndex, run: str) -> None:
    """The filters, the page of matching rollouts and the group picked, of a run's indexed rollouts."""
    frame = index.frame()
    left, middle, right = st.columns(3)
    first, last = int(frame["step"].min()), int(frame["step"].max())
    steps = (first, last) if first == last else range_slider(left, "Steps", first, last, key="ro_steps")
    in_steps = frame[(frame["step"] >= steps[0]) & (frame["step"] <= steps[1])]
    prompts = in_steps["prompt"].dropna().unique()
    prompt = None
    if len(prompts) <= MAX_PROMPT_CHOICES:
        labels = prompt_labels(list(map(str, prompts)))
        choice = middle.selectbox(
            "Prompt", ["(all)", *labels], format_func=lambda p: labels.get(p, p), key="ro_prompt"
        )
        prompt = None if choice == "(all)" else choice
    else:
        middle.caption(f"{len(prompts)} prompts in these steps: narrow the steps to pick one.")
    rewards = None
    finite = frame["reward"].dropna()
    if len(finite) and finite.min() < finite.max():
        low, high = float(finite.min()), float(finite.max())
        picked = range_slider(right, "Reward", low, high, key="ro_reward")
        rewards = None if picked == (low, high) else picked  # the whole range keeps the null rewards too
    needle = st.text_input("Search prompt and completion text", key="ro_search")

    lines = filter_lines(frame, steps, prompt, rewards)
    if needle:
        lines = index.search(needle, lines)
    st.caption(f"{len(lines)} of {len(frame)} rollouts match")
    if not len(lines):
        return
    size_col, page_col = st.columns(2)
    size = size_col.selectbox("Rows per page", PAGE_SIZES, index=1, key="ro_page_size")
    pages = math.ceil(len(lines) / size)
    page = page_col.number_input(f"Page (of {pages})", 1, pages, 1, key="ro_page")
    shown = lines[(page - 1) * size : page * size]
    table = page_table(index, shown)
    st.dataframe(
        table, hide_index=True, column_config={"completion": st.column_config.TextColumn(width="large")}
    )
    state.download_csv(table, state.file_name("rollouts-page", run), key="ro_page_csv", index=False)
    st.download_button(
        "Download all matching rollouts (CSV)",
        data=lambda: state.csv_bytes(page_table(index, lines), index=False),
        file_name=state.file_name("rollouts-all", run) + ".csv",
        mime="text/csv",
        key="ro_all_csv",
        on_click="ignore",
    )

    st.subheader("Group")
    pick = st.selectbox(
        "Rollout line (its whole group is shown)",
        [int(x) for x in shown],
        format_func=lambda x: f"line {x} · step {frame.at[x, 'step']} · group {frame.at[x, 'group']}",
        key="ro_group",
    )
    members = group_lines(frame, pick)
    rows = index.rows(members)
    st.caption("prompt")
    st.code(_text(rows[0].get("prompt")), language=None, wrap_lines=True)
    per_row = min(4, len(rows))
    for start in range(0, len(rows), per_row):
        columns = st.columns(per_row)
        for offset, (line, row) in enumerate(
            zip(members[start : start + per_row], rows[start : start + per_row], strict=True)
        ):
            columns[offset].markdown(f"**#{start + offset}** (line {int(line)})")
            show_rollout(row, columns[offset], run, int(line))
