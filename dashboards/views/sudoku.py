"""Sudoku page: a rollout's board — givens, the model's fill with errors marked, and its emission order as
numbers or a colour ramp next to the solver's order (with their rank correlation).

Reads rollouts.jsonl rows carrying `puzzle`, `solution`, `emitted` and optionally `solver_order`
(docs/dashboards.md); rows are 0-based, values 1..n, empty cells 0 or ".".
"""

import math

import numpy as np
import pandas as pd
import streamlit as st

from dashboards import state
from dashboards.plots import Plot

APPS = ("sudoku",)
PALETTE = {"given": "#d9d9d9", "correct": "#a6dba0", "wrong": "#f4a582", "empty": "#ffffff"}


def parse_grid(value: object, field: str) -> np.ndarray:
    """An (n, n) int array from a string of n*n characters ("0" or "." empty) or a list of rows.

    >>> parse_grid("1.3.", "puzzle").tolist()
    [[1, 0], [3, 0]]
    """
    if isinstance(value, str):
        cells = [0 if ch in ".0" else int(ch, 36) for ch in value.strip()]
    elif isinstance(value, list) and all(isinstance(row, list) for row in value):
        cells = [int(x or 0) for row in value for x in row]
    else:
        raise ValueError(
            f"sudoku field {field!r}: expected a string or a list of rows, got {type(value).__name__}"
        )
    n = math.isqrt(len(cells))
    if n * n != len(cells) or n == 0:
        raise ValueError(f"sudoku field {field!r}: {len(cells)} cells is not a square board")
    return np.asarray(cells, dtype=np.int64).reshape(n, n)


def board_cells(row: dict) -> pd.DataFrame:
    """One row per cell: row, col, given, value (the puzzle's or the model's first emission), kind
    (given / correct / wrong / empty), order (1-based rank of the first emission into the cell) and
    solver_rank (1-based, from `solver_order`); later emissions into a cell and emissions into givens are
    ignored, as the Sudoku reward scores only the first emission of each empty cell."""
    puzzle = parse_grid(row["puzzle"], "puzzle")
    solution = parse_grid(row["solution"], "solution")
    n = len(puzzle)
    if solution.shape != puzzle.shape:
        raise ValueError(
            f"sudoku: solution is {solution.shape[0]}x{solution.shape[0]} but the puzzle is {n}x{n}"
        )
    value, order = puzzle.copy(), np.zeros_like(puzzle)
    rank = 0
    for r, c, v in _integer_lists(row, "emitted", "[row, col, value]"):
        if 0 <= r < n and 0 <= c < n and puzzle[r, c] == 0 and order[r, c] == 0:
            rank += 1
            value[r, c], order[r, c] = v, rank
    solver = np.zeros_like(puzzle)
    for k, (r, c) in enumerate(_integer_lists(row, "solver_order", "[row, col]")):
        if not (0 <= r < n and 0 <= c < n):
            raise ValueError(f"sudoku field 'solver_order': cell {[r, c]} is off the {n}x{n} board")
        solver[r, c] = k + 1
    records = []
    for r in range(n):
        for c in range(n):
            if puzzle[r, c]:
                kind = "given"
            elif order[r, c] == 0:
                kind = "empty"
            else:
                kind = "correct" if value[r, c] == solution[r, c] else "wrong"
            records.append(
                {
                    "row": r,
                    "col": c,
                    "value": int(value[r, c]) or None,
                    "kind": kind,
                    "order": int(order[r, c]) or None,
                    "solver_rank": int(solver[r, c]) or None,
                }
            )
    return pd.DataFrame(records)


def _integer_lists(row: dict, field: str, shape: str) -> list[list[int]]:
    """`row[field]` (absent or null: []) as lists of integers shaped like `shape`; anything else (a null
    cell, text, a number where a list should be) is an error naming the field."""
    value = row.get(field) or []
    width = shape.count(",") + 1

    def integer(x: object) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool) and float(x).is_integer()

    if not isinstance(value, list) or not all(
        isinstance(entry, list) and len(entry) == width and all(map(integer, entry)) for entry in value
    ):
        raise ValueError(f"sudoku field {field!r}: expected a list of {shape} integers")
    return [[int(x) for x in entry] for entry in value]


def spearman(a: pd.Series, b: pd.Series) -> float | None:
    """Spearman rank correlation over the cells where both are set (None with fewer than 2 such cells).

    >>> spearman(pd.Series([1, 2, 3]), pd.Series([3, 2, 1]))
    -1.0
    """
    both = pd.DataFrame({"a": a, "b": b}).dropna()
    if len(both) < 2:
        return None
    ranks = both.rank()
    value = ranks["a"].corr(ranks["b"])
    return None if pd.isna(value) else float(value)


def _label(value: object) -> str:
    return "" if value is None or pd.isna(value) else str(int(value))


def render() -> None:
    st.title("Sudoku")
    names = state.require_runs(APPS)
    # only GRPO runs log rollouts: not a pipeline, its SFT stages, or an evaluation
    grpo = [name for name in names if state.run_info(name).algorithm == "grpo"]
    run = state.pick_run(grpo or names, key="sudoku_run")
    try:
        index = state.rollouts(run)
    except ValueError as e:
        state.show_error(f"Cannot read the rollouts of {run}:", e)
        return
    if not len(index):
        st.info(f"{run} has logged no rollouts yet.")
        return
    frame = index.frame()
    steps = sorted(frame["step"].unique().tolist())
    step = (
        steps[0] if len(steps) == 1 else st.select_slider("Step", steps, value=steps[-1], key="sudoku_step")
    )
    lines = frame.index[frame["step"] == step].tolist()
    line = st.selectbox(
        "Rollout",
        lines,
        key="sudoku_line",
        format_func=lambda x: f"line {x} · group {frame.at[x, 'group']} · reward {frame.at[x, 'reward']}",
    )
    (row,) = index.rows([line])
    missing = [field for field in ("puzzle", "solution") if field not in row]
    if missing:
        st.warning(
            f"This rollout has no {' / '.join(missing)} field: see docs/dashboards.md for the Sudoku schema."
        )
        return
    try:
        cells = board_cells(row)
    except ValueError as e:
        state.show_error(f"Cannot draw the board of line {line}:", e)
        return
    open_cells = cells[cells["kind"] != "given"]
    correct, wrong = int((cells["kind"] == "correct").sum()), int((cells["kind"] == "wrong").sum())
    rho = spearman(cells["order"], cells["solver_rank"])
    a, b, c, d = st.columns(4)
    a.metric("Empty cells", len(open_cells))
    b.metric("Filled correctly", correct)
    c.metric("Errors", wrong)
    d.metric("Order vs solver (Spearman)", "—" if rho is None else f"{rho:+.2f}")

    mode = st.radio(
        "Show",
        ["values", "emission order (numbers)", "emission order (colour ramp)"],
        horizontal=True,
        key="sudoku_mode",
    )
    cells["label"] = [
        _label(v) for v in (cells["value"] if mode != "emission order (numbers)" else cells["order"])
    ]
    left, right = st.columns(2)
    with left:
        if mode == "emission order (colour ramp)":
            model = Plot("grid", cells, x="col", y="row", color="order", text="label", title="model order")
        else:
            model = Plot(
                "grid",
                cells,
                x="col",
                y="row",
                color="kind",
                text="label",
                palette=PALETTE,
                title="model fill (green correct, red wrong, grey given)",
            )
        state.show_plot(model, state.file_name("sudoku", run, str(line)), key="sudoku_png")
    with right:
        if cells["solver_rank"].notna().any():
            solver = cells.assign(label=[_label(v) for v in cells["solver_rank"]])
            plot = Plot(
                "grid", solver, x="col", y="row", color="solver_rank", text="label", title="solver order"
            )
            state.show_plot(plot, state.file_name("sudoku-solver", run, str(line)), key="sudoku_solver_png")
        else:
            st.caption("This rollout has no solver_order.")
    with st.expander("Cells"):
        state.show_table(
            cells.drop(columns="label"),
            state.file_name("sudoku-cells", run, str(line)),
            key="sudoku_csv",
            index=False,
        )
    if "completion" in row:
        st.caption("completion")
        st.code(str(row["completion"]), language=None, wrap_lines=True)
