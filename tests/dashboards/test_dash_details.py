"""Details of the dashboards that a user sees but the other tests left open: which folders run discovery skips,
the chart specs (points, y scale, facet columns, grouped bars, grid cell size), the pages' defaults (smoothing,
rows per page, how many responses, colour per run only with several runs) and edge cases of the readers."""

import json
import subprocess
import sys
from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from dashboards import loading, plots, state
from dashboards.views import public_goods, sudoku, tcm

from .conftest import make_run, sudoku_row, toy_rollouts
from .test_dash_pages import charts, open_page, texts

# -- loading -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "folder", [".hidden", "checkpoints", "base_model", "final", "tensorboard", "__pycache__"]
)
def test_run_discovery_skips_hidden_and_run_output_folders(tmp_path, folder):
    for run in ("toy/a", f"toy/a/{folder}/x", f"{folder}/y"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "config.json").write_text('{"app": "toy"}')
    assert loading.find_runs(tmp_path) == ["toy/a"]


def test_a_status_step_ahead_of_the_metrics_is_kept():
    """A run resumed from a checkpoint (status.json: step 5) whose metrics.jsonl holds steps up to 3 only."""
    info = loading.RunInfo("r", "toy", "grpo", "running", 5, "", None, None)
    progress = loading.with_progress(info, pd.DataFrame({"step": [1, 2, 3]}), 0.0)
    assert progress.step == 5


def test_config_diff_marks_a_field_one_run_lacks_and_tells_it_from_null():
    diff = loading.config_diff({"x": {"a": 1, "b": 2, "c": None}, "y": {"a": 1}})
    assert diff.to_dict(orient="index") == {"b": {"x": "2", "y": "—"}, "c": {"x": "None", "y": "—"}}


def test_default_metrics_take_every_kl_column():
    columns = ["step", "kl/ref", "policy/kl", "kl", "klass", "reward"]
    assert loading.default_metrics(columns) == ["reward", "kl/ref", "policy/kl", "kl"]  # as logged


def test_a_line_holding_the_needle_twice_is_one_match(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    rows = [{"step": 1, "prompt": "cat", "completion": "cat and cat"}, {"step": 1, "completion": "dog"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert loading.RolloutIndex(path).refresh().search("cat").tolist() == [0]


def test_a_search_run_again_is_kept_as_the_most_recent(tmp_path):
    """The kept matches are those of the last SEARCHES_KEPT needles searched: a needle searched again is the
    most recent, and the next new needle evicts the one searched longest ago."""
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps({"step": 1, "completion": f"w{k}"}) + "\n" for k in range(10)))
    index = loading.RolloutIndex(path).refresh()
    for k in range(loading.SEARCHES_KEPT):
        index.search(f"w{k}")
    index.search("w0")
    index.search("w9")
    assert list(index._searches) == [f"w{k}" for k in range(2, 8)] + ["w0", "w9"]


def test_an_empty_search_keeps_the_lines_given(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps({"step": 1, "completion": f"c{k}"}) + "\n" for k in range(4)))
    index = loading.RolloutIndex(path).refresh()
    assert index.search("").tolist() == [0, 1, 2, 3]
    assert index.search("", np.array([1, 3])).tolist() == [1, 3]


# -- state ---------------------------------------------------------------------------------------------------


def test_download_file_names_keep_dots_and_are_cut_to_120_characters():
    assert state.file_name("curves", "public-goods/r3.5") == "curves-public-goods_r3.5"
    assert state.file_name("x" * 200) == "x" * 120
    assert state.file_name("") == "export"


def test_the_runs_table_shows_when_a_running_run_last_wrote_its_metrics(runs_root):
    """status.json was last written long ago (its start); metrics.jsonl since: the table shows the latter."""
    status_path = runs_root / "toy/b/status.json"
    status_path.write_text(
        json.dumps(json.loads(status_path.read_text()) | {"updated": "2020-01-01T00:00:00+00:00"})
    )
    mtime = (runs_root / "toy/b/metrics.jsonl").stat().st_mtime_ns / 1e9
    table = open_page("runs").dataframe[0].value.set_index("run")
    assert table.loc["toy/b", "updated"] == datetime.fromtimestamp(mtime).astimezone().isoformat(
        timespec="seconds"
    )


# -- plots ---------------------------------------------------------------------------------------------------


def test_line_chart_spec():
    """Points on a short line only; a y axis that need not start at 0; facets two per row."""
    few = pd.DataFrame({"step": [1, 2, 3], "value": [10.0, 11.0, 12.0], "metric": ["a"] * 3})
    spec = plots.Plot("line", few, x="step", y="value", facet="metric").chart().to_dict()
    assert spec["columns"] == 2
    assert spec["spec"]["mark"] == {"type": "line", "point": True}
    assert spec["spec"]["encoding"]["y"]["scale"] == {"zero": False}
    many = pd.DataFrame({"step": range(200), "value": np.arange(200.0)})
    assert plots.Plot("line", many, x="step", y="value").chart().to_dict()["mark"] == {
        "type": "line",
        "point": False,
    }


def test_bar_chart_puts_each_colours_bars_side_by_side():
    data = pd.DataFrame({"type": ["a", "a"], "accuracy": [0.5, 0.7], "run": ["r1", "r2"]})
    encoding = plots.Plot("bar", data, x="type", y="accuracy", color="run").chart().to_dict()["encoding"]
    assert encoding["xOffset"] == {"field": "run", "type": "nominal"}


def test_grid_chart_cells_fit_the_longer_side_in_360_pixels():
    """2 rows x 20 columns: 360 // 20 = 18 pixels a cell (36 at most, 8 at least)."""
    cells = pd.DataFrame({"row": [0, 1], "col": [0, 19], "v": [1.0, 2.0]})
    spec = plots.Plot("grid", cells, x="col", y="row", color="v").chart().to_dict()
    assert spec["width"] == spec["height"] == {"step": 18}


# -- pages ---------------------------------------------------------------------------------------------------


def test_curves_of_one_run_are_unsmoothed_and_not_coloured_by_run(runs_root):
    at = open_page("curves", run="toy/a")
    assert at.slider(key="curves_smoothing").value == 0.0
    data = at.dataframe[0].value
    assert data["value"].tolist() == data["raw"].tolist()
    (spec,) = charts(at)
    assert "color" not in spec["spec"]["encoding"] and spec["title"] == ""
    at.slider(key="curves_smoothing").set_value(0.5).run()
    assert charts(at)[0]["title"] == "smoothed"


def test_tcm_bars_of_one_run_are_not_coloured_by_run(runs_root):
    (spec,) = charts(open_page("tcm", run="tcm/t1"))
    assert "color" not in spec["encoding"]


def test_debias_shows_five_responses_of_each_kind_by_default(runs_root):
    responses = [
        {"category": "age", "stage": "after", "prompt": f"p{k}", "response": f"r{k}", "bias": k / 10}
        for k in range(7)
    ]
    make_run(runs_root, "debias/many", "debias").write_eval({"bias": {}, "responses": responses})
    at = open_page("debias", run="debias/many")
    assert at.number_input(key="debias_k").value == 5
    assert at.dataframe[0].value["response"].tolist() == ["r0", "r1", "r2", "r3", "r4"]
    assert at.dataframe[1].value["response"].tolist() == ["r6", "r5", "r4", "r3", "r2"]


def test_cooperation_points_are_ordered_by_r():
    points = [{"r": r, "cooperation": r / 10} for r in (5.0, 3.0, 4.0)]
    curves = public_goods.cooperation_curves({"x": {"cooperation_vs_r": points}})
    assert curves["r"].tolist() == [3.0, 4.0, 5.0]


def test_the_rollouts_page_shows_50_rows_per_page_by_default(runs_root):
    run = make_run(runs_root, "toy/many", "toy")
    for step in (1, 2, 3, 4):
        run.log_rollouts(toy_rollouts(step))
    at = open_page("rollouts", run="toy/many")
    assert at.selectbox(key="ro_page_size").value == 50
    assert at.number_input(key="ro_page").label == "Page (of 1)" and len(at.dataframe[0].value) == 32


@pytest.mark.parametrize("limit, picker", [(2, True), (1, False)])
def test_the_prompt_picker_is_offered_up_to_max_prompt_choices(runs_root, monkeypatch, limit, picker):
    from dashboards.views import rollouts

    monkeypatch.setattr(rollouts, "MAX_PROMPT_CHOICES", limit)
    at = open_page("rollouts", run="toy/a")  # 2 prompts
    pickers = [len(box.options) for box in at.selectbox if box.key == "ro_prompt"]
    assert pickers == ([3] if picker else [])  # (all) and the 2 prompts
    note = "2 prompts in these steps: narrow the steps to pick one."
    assert (note in texts(at.caption)) != picker


def test_rollouts_of_a_single_reward_have_no_reward_range(runs_root):
    rows = [{**row, "reward": 1.0} for row in toy_rollouts(1)]
    make_run(runs_root, "toy/flat", "toy").log_rollouts(rows)
    at = open_page("rollouts", run="toy/flat")
    assert not [s for s in at.slider if s.key == "ro_reward"]
    assert "8 of 8 rollouts match" in texts(at.caption)


def test_a_group_of_four_is_shown_side_by_side_in_one_row(runs_root):
    at = open_page("rollouts", run="toy/a")
    group = [column.proto.weight for column in at.columns][-4:]
    assert group == pytest.approx([0.25] * 4)


def test_sudoku_grids_from_text_with_a_newline_lists_with_nulls_and_letters_beyond_9():
    assert sudoku.parse_grid("1.3.\n", "puzzle").tolist() == [[1, 0], [3, 0]]
    assert sudoku.parse_grid([[1, None], [0, 2]], "puzzle").tolist() == [[1, 0], [0, 2]]
    board = "g" + "." * 255  # a 16x16 board: values 1..16 as 1-9, a-g
    assert sudoku.parse_grid(board, "puzzle")[0, 0] == 16


def test_sudoku_emissions_off_the_board_are_ignored():
    row = sudoku_row() | {"emitted": [[-1, 3, 4], [4, 0, 1], [0, -1, 2], [0, 1, 2]]}
    cells = sudoku.board_cells(row).set_index(["row", "col"])
    assert cells.loc[(0, 1)].to_dict() == {"value": 2, "kind": "correct", "order": 1, "solver_rank": 1}
    assert cells.loc[(3, 3), "kind"] == "empty" and cells.loc[(0, 3), "kind"] == "empty"


def test_a_sudoku_rollout_without_a_solution_is_named(runs_root):
    row = {k: v for k, v in sudoku_row().items() if k != "solution"}
    make_run(runs_root, "sudoku/nosol", "sudoku").log_rollouts([row])
    at = open_page("sudoku", run="sudoku/nosol")
    assert texts(at.warning) == [
        "This rollout has no solution field: see docs/dashboards.md for the Sudoku schema."
    ]


def test_eval_numbers_that_are_not_finite_are_left_out():
    """Python's json reads NaN and Infinity (another writer's eval.json): no number to draw."""
    assert [state.number(v) for v in (float("nan"), float("inf"), -float("inf"), 2)] == [
        None,
        None,
        None,
        2.0,
    ]
    rows = tcm.accuracy_rows(json.loads('{"t": {"accuracy_by_type": {"a": NaN, "b": Infinity, "c": 0.5}}}'))
    assert rows[["type", "accuracy"]].values.tolist() == [["c", 0.5]]


def test_a_long_prompt_is_cut_to_the_width_with_its_ellipsis():
    from dashboards.views.rollouts import _short

    assert _short("abcdefghijkl", 10) == "abcdefghi…" and _short("abcdefghij", 10) == "abcdefghij"
    assert _short("a\nb", 10) == "a ⏎ b"


def test_the_group_of_a_rollout_without_group_or_prompt_is_the_steps_rollouts_without_a_prompt(runs_root):
    run = make_run(runs_root, "toy/mixed", "toy")
    rows = [
        {"step": 1, "completion": "bare", "reward": 1.0},
        {"step": 1, "prompt": "q", "completion": "asked"},
    ]
    run.log_rollouts([*rows, {"step": 2, "completion": "later", "reward": 0.0}])
    at = open_page("rollouts", run="toy/mixed")
    at.selectbox(key="ro_group").set_value(0).run()
    assert texts(at.code) == ["", "bare"]  # no prompt, then its group: line 0 alone


def test_curves_of_runs_that_log_different_metrics(runs_root):
    """toy/a logs the reward; toy/loss only a loss: each run draws the metrics it has."""
    make_run(runs_root, "toy/loss", "toy").log_metrics(1, {"loss": 2.0})
    at = open_page("curves", run=["toy/a", "toy/loss"])
    at.multiselect(key="curves_metrics").set_value(["reward", "loss"]).run()
    assert not at.exception
    data = at.dataframe[0].value
    assert data[["run", "metric", "step"]].values.tolist() == [
        ["toy/a", "reward", 1],
        ["toy/a", "reward", 2],
        ["toy/a", "reward", 3],
        ["toy/a", "loss", 1],
        ["toy/a", "loss", 2],
        ["toy/a", "loss", 3],
        ["toy/loss", "loss", 1],
    ]


def test_debias_categories_and_stages_are_offered_in_order(runs_root):
    at = open_page("debias")  # responses list gender, then age; stages after, then before
    assert at.selectbox(key="debias_category").options == ["(all)", "age", "gender"]
    assert at.selectbox(key="debias_stage").options == ["(all)", "after", "before"]


def test_the_runs_table_shows_the_reward_of_the_last_step_not_the_best(runs_root):
    run = make_run(runs_root, "toy/down", "toy")
    for step, reward in ((1, 0.9), (2, 0.4)):
        run.log_metrics(step, {"reward": reward})
    table = open_page("runs").dataframe[0].value.set_index("run")
    assert table.loc["toy/down", "reward (last step)"] == pytest.approx(0.4)


def test_rollout_index_starts_over_when_the_file_is_replaced_by_one_of_the_same_size(tmp_path):
    """A replaced file (another inode) is read again even where its last line and size match the old one's."""
    path = tmp_path / "rollouts.jsonl"

    def write(first: str) -> None:
        rows = [{"step": 1, "prompt": first}, {"step": 2, "prompt": "same"}]
        tmp = path.with_name("tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tmp.replace(path)

    write("A")
    index = loading.RolloutIndex(path).refresh()
    write("B")
    assert index.refresh().frame()["prompt"].tolist() == ["B", "same"]


def test_a_crashed_run_gets_no_live_view(runs_root):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=60)
    status_path = runs_root / "toy/b/status.json"
    status_path.write_text(json.dumps(json.loads(status_path.read_text()) | {"pid": gone.pid}))
    at = open_page("runs", run="toy/b")
    assert texts(at.warning)[0].startswith("toy/b stopped at step 1: process")
    assert "Live" not in texts(at.subheader) and not [t for t in at.toggle if t.key == "runs_live"]


def test_a_crashed_runs_cut_off_metrics_line_is_warned_once_on_the_runs_page(runs_root):
    """The table and the crashed run's note each read its metrics, and each warned."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=60)
    status_path = runs_root / "toy/b/status.json"
    status_path.write_text(json.dumps(json.loads(status_path.read_text()) | {"pid": gone.pid}))
    metrics_path = runs_root / "toy/b/metrics.jsonl"
    with metrics_path.open("a") as f:
        f.write('{"step": 9, "rew')
    at = open_page("runs", run="toy/b")
    cut_off = [t for t in texts(at.warning) if "has no newline" in t]
    assert len(cut_off) == 1 and cut_off[0].startswith(f"`{metrics_path.resolve()}`: line ")
    assert any(t.startswith("toy/b stopped at step 1: process") for t in texts(at.warning))
