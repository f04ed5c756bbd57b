"""Sudoku rollouts carry the board the dashboard's Sudoku page reads (docs/dashboards.md): `board_fields` of a
hand-written completion, then a smoke `grpo-suite sudoku train` into a runs folder, shown by the page."""

import json

import pytest
from streamlit.testing.v1 import AppTest

from apps.sudoku.rewards import board_fields, cell_reward
from core.cli import main

# 4x4, solution 1234/3412/2143/4321; empty cells (0,1), (0,3), (1,0), (3,3), which the solver fills in that order
EXAMPLE = {
    "n": 4,
    "puzzle": "1.3..4122143432.",
    "solution": "1234341221434321",
    "solver_order": [1, 3, 4, 15],
}


def test_board_fields_of_a_hand_written_completion():
    # (0,3)=4 right, (0,1)=2 right, (1,0)=1 wrong, (0,3) again (ignored), a given (ignored), (3,3)=1 right
    completion = "r1 c4 v4 r1 c2 v2 r2 c1 v1 r1 c4 v1 r3 c3 v4 r4 c4 v1"
    assert board_fields(completion, EXAMPLE) == {
        "puzzle": "1.3..4122143432.",
        "solution": "1234341221434321",
        "emitted": [[0, 3, 4], [0, 1, 2], [1, 0, 1], [3, 3, 1]],
        "solver_order": [[0, 1], [0, 3], [1, 0], [3, 3]],
    }
    assert cell_reward(completion, EXAMPLE) == 0.75


def page_app():
    from dashboards.views import sudoku

    sudoku.render()


def test_smoke_train_rollouts_fill_the_sudoku_page(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    args = ["sudoku", "train", "--preset", "smoke", "--eval-puzzles", "0"]
    assert main([*args, "--run-dir", str(runs / "sudoku" / "s1")]) == 0
    lines = (runs / "sudoku" / "s1" / "rollouts.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 2 * 2 * 4  # steps x prompts x group
    for row in rows:
        puzzle, solution = row["puzzle"], row["solution"]
        words = row["prompt"].split()[1:-1]  # the givens' triplets between the size word and <sol>
        givens = {
            (int(r[1]) - 1) * 4 + int(c[1]) - 1: v[1] for r, c, v in zip(*[iter(words)] * 3, strict=True)
        }
        assert [puzzle[i] for i in sorted(givens)] == [givens[i] for i in sorted(givens)]
        empty = {i for i, ch in enumerate(puzzle) if ch == "."}
        assert len(empty) == 16 - len(givens) and all(ch != "." for ch in solution)
        assert sorted(r * 4 + c for r, c in row["solver_order"]) == sorted(empty)
        cells = [r * 4 + c for r, c, _ in row["emitted"]]
        assert len(cells) == len(set(cells)) and set(cells) <= empty
        right = sum(solution[r * 4 + c] == str(v) for r, c, v in row["emitted"])
        assert row["rewards"]["cell"] == pytest.approx(right / len(empty))  # the reward's own count

    monkeypatch.setenv("GRPO_SUITE_RUNS", str(runs))
    at = AppTest.from_function(page_app, default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="sudoku_run").value == "sudoku/s1"
    line = at.selectbox(key="sudoku_line").value
    assert line == 8  # the first rollout of the last step
    shown = rows[line]
    right = sum(shown["solution"][r * 4 + c] == str(v) for r, c, v in shown["emitted"])
    values = {m.label: m.value for m in at.metric}
    assert values["Empty cells"] == str(shown["puzzle"].count("."))
    assert values["Filled correctly"] == str(right)
    assert values["Errors"] == str(len(shown["emitted"]) - right)
