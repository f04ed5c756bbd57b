"""The dashboards' readers without Streamlit: path confinement, run discovery, config diff, smoothing, the lazy
rollout index (incremental, search, a live run's half-written line) and PNG export."""

import doctest
import io
import json
from datetime import datetime

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dashboards import loading, plots
from dashboards.views import debias, math_page, page_for_app, public_goods, sudoku, tcm

from .conftest import SCRIPT, make_run, sudoku_row


def test_doctests():
    for module in (loading, sudoku):
        assert doctest.testmod(module).failed == 0


@pytest.mark.parametrize(
    "name",
    ["..", "../x", "toy/../../x", "/etc", "/etc/passwd", "a\\..\\b", "", "toy/a\x00"],
)
def test_unsafe_names_are_refused(runs_root, name):
    with pytest.raises(loading.UnsafePath, match="refused run path"):
        loading.resolve_run(runs_root, name)


def test_a_colon_is_a_drive_only_on_windows(runs_root, monkeypatch):
    make_run(runs_root, "lr:1e-3/a", "toy")
    assert "lr:1e-3/a" in loading.find_runs(runs_root)
    assert loading.resolve_run(runs_root, "lr:1e-3/a") == (runs_root / "lr:1e-3/a").resolve()
    monkeypatch.setattr(loading.os, "name", "nt")  # the check comes before any Path is made
    with pytest.raises(loading.UnsafePath, match="absolute paths are not allowed"):
        loading.resolve_run(runs_root, "C:/x")


def test_symlink_out_of_the_folder_is_refused_and_not_listed(runs_root, tmp_path):
    outside = tmp_path / "outside"
    (outside / "run").mkdir(parents=True)
    (outside / "run" / "config.json").write_text("{}")
    (runs_root / "escape").symlink_to(outside)
    with pytest.raises(loading.UnsafePath, match="outside the runs folder"):
        loading.resolve_run(runs_root, "escape/run")
    assert not any(name.startswith("escape") for name in loading.find_runs(runs_root))


def test_a_symlink_loop_is_a_refused_run_name_not_a_crash(runs_root):
    (runs_root / "loop").symlink_to(runs_root / "loop")
    with pytest.raises(loading.UnsafePath, match="refused run path 'loop/x'"):
        loading.resolve_run(runs_root, "loop/x")
    assert "loop" not in loading.find_runs(runs_root)


def test_a_running_run_shows_the_step_of_its_metrics_not_of_its_last_checkpoint(runs_root):
    """A trainer rewrites status.json at its start and checkpoints only; metrics.jsonl at every step."""
    info = loading.run_info(runs_root, "toy/b")
    assert (info.status, info.step) == ("running", 1)
    frame = pd.DataFrame({"step": [1, 2, 3]})
    later = datetime.fromisoformat(info.updated).timestamp() + 90
    progress = loading.with_progress(info, frame, later)
    assert progress.step == 3
    assert datetime.fromisoformat(progress.updated).timestamp() == later
    earlier = loading.with_progress(info, frame, later - 3600)  # metrics older than the status
    assert (earlier.step, earlier.updated) == (3, info.updated)
    assert loading.with_progress(info, frame.iloc[:0], later) == info
    finished = loading.run_info(runs_root, "toy/a")
    assert loading.with_progress(finished, pd.DataFrame({"step": [9]}), later) == finished


def test_the_runs_inside_a_pipeline_run_are_listed(tmp_path):
    for run in ("sudoku/pipe", "sudoku/pipe/grpo-w1", "sudoku/pipe/sft-random", "sudoku/pipe/final/x"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "config.json").write_text('{"app": "sudoku"}')
    (tmp_path / "sudoku/pipe/grpo-w1/model").mkdir()  # a model directory's config.json is not a run's
    (tmp_path / "sudoku/pipe/grpo-w1/model/config.json").write_text('{"model_type": "llama"}')
    assert loading.find_runs(tmp_path) == ["sudoku/pipe", "sudoku/pipe/grpo-w1", "sudoku/pipe/sft-random"]
    assert loading.find_runs(tmp_path / "sudoku" / "pipe") == [".", "grpo-w1", "sft-random"]


def test_find_runs_and_info(runs_root):
    names = loading.find_runs(runs_root)
    assert names == [
        "debias/d1",
        "math/m1",
        "math/m2",
        "math/m3",
        "public-goods/p1",
        "sudoku/s1",
        "tcm/t1",
        "toy/a",
        "toy/b",
        "toy/c",
    ]
    assert loading.resolve_run(runs_root, "toy/a") == (runs_root / "toy/a").resolve()
    with pytest.raises(FileNotFoundError):
        loading.resolve_run(runs_root, "toy/missing")
    infos = {name: loading.run_info(runs_root, name) for name in ("toy/a", "toy/b", "toy/c", "math/m3")}
    assert [infos[n].status for n in ("toy/a", "toy/b", "toy/c")] == ["finished", "running", "failed"]
    assert infos["toy/a"].step == 3 and infos["math/m3"].algorithm == "gtpo"
    assert infos["math/m3"].status == "unknown"  # no status.json
    assert infos["toy/c"].error == "CUDA out of memory <b>x</b>"
    bogus = make_run(runs_root, "toy/bogus", "toy")  # a status the dashboards do not know
    bogus.status_path.write_text(json.dumps({"status": "bogus", "step": 2, "updated": None, "error": None}))
    info = loading.run_info(runs_root, "toy/bogus")
    assert info.status == "unknown" and info.step == 2


def test_config_diff_keeps_only_differing_fields(runs_root):
    configs = {name: loading.run_config(runs_root, name) for name in ("toy/a", "toy/b", "math/m3")}
    diff = loading.config_diff(configs)
    assert list(diff.columns) == ["toy/a", "toy/b", "math/m3"]
    assert diff.loc["learning_rate"].tolist() == ["0.001", "0.01", "0.001"]
    assert diff.loc["app"].tolist() == ["toy", "toy", "math"]
    assert diff.loc["algorithm"].tolist() == ["grpo", "grpo", "gtpo"]
    assert "run_dir" not in diff.index and "seed" not in diff.index
    same = loading.config_diff({n: loading.run_config(runs_root, n) for n in ("toy/a", "toy/c")})
    assert same.empty


def test_run_config_shows_the_settings_a_resumed_run_last_ran_with(runs_root):
    config = {**loading.RunDir(runs_root / "toy/a").read_config()["config"], "learning_rate": 0.005}
    loading.RunDir.create(runs_root / "toy/a", config, app="toy", algorithm="grpo", exist_ok_for_resume=True)
    assert loading.run_config(runs_root, "toy/a")["learning_rate"] == 0.005


def test_smooth_matches_a_plain_loop():
    values = np.array([1.0, np.nan, 4.0, 2.0, 8.0])
    weight = 0.7
    expected, num, den = [], 0.0, 0.0
    for x in values:
        if np.isnan(x):
            expected.append(np.nan)
            continue
        num, den = weight * num + (1 - weight) * x, weight * den + (1 - weight)
        expected.append(num / den)
    np.testing.assert_allclose(loading.smooth(values, weight), expected)
    np.testing.assert_array_equal(loading.smooth(values, 0.0), values)
    with pytest.raises(ValueError):
        loading.smooth(values, 1.0)


def test_metrics_frame(runs_root):
    frame = loading.read_metrics(runs_root / "toy/a")
    assert frame["step"].tolist() == [1, 2, 3]
    assert frame["reward"].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert loading.default_metrics(list(frame.columns)) == [
        "reward",
        "reward/correct",
        "reward/format",
        "zero_spread_frac",
        "kl",
        "entropy",
        "clip/frac",
    ]


def test_a_run_without_rollouts_has_an_empty_index(tmp_path):
    index = loading.RolloutIndex(tmp_path / "rollouts.jsonl").refresh()
    assert len(index) == 0 and len(index.frame()) == 0
    assert index.search("anything").tolist() == []


def test_rollout_index_reads_incrementally_and_lazily(runs_root):
    path = runs_root / "toy/a/rollouts.jsonl"
    index = loading.RolloutIndex(path).refresh()
    frame = index.frame()
    assert len(frame) == 24 and frame["step"].tolist() == [1] * 8 + [2] * 8 + [3] * 8
    assert frame.loc[5, "reward"] == pytest.approx(1.25) and frame.loc[5, "advantage"] == pytest.approx(
        -0.125
    )
    assert frame.loc[5, "prompt"] == "prompt 1" and frame.loc[5, "group"] == 1
    rows = index.rows([7, 0])
    assert rows[0]["completion"] == f"answer s1 g1 k3 {SCRIPT}" and rows[1]["completion"] == "answer s1 g0 k0"
    # A live writer: a half-written line is left for later, finished lines are added.
    line = json.dumps(
        {"step": 4, "prompt": "late", "completion": "new", "reward": 9.0, "rewards": {"extra": 1.0}}
    )
    with path.open("a") as f:
        f.write(line[:10])
    assert len(index.refresh()) == 24
    with path.open("a") as f:
        f.write(line[10:] + "\n")
    frame = index.refresh().frame()
    assert len(frame) == 25 and frame.loc[24, "prompt"] == "late" and frame.loc[24, "reward"] == 9.0
    assert pd.isna(frame.loc[24, "group"]) and np.isnan(frame.loc[24, "advantage"])
    assert index.rows([24])[0]["completion"] == "new"
    # A resume truncates the file (rewritten atomically): the index starts over.
    kept = path.read_bytes().split(b"\n")[:3]
    tmp = path.with_name("tmp")
    tmp.write_bytes(b"\n".join(kept) + b"\n")
    tmp.replace(path)
    assert len(index.refresh()) == 3


@pytest.mark.parametrize("extra", [0, 3])
def test_rollout_index_starts_over_when_the_file_is_rewritten_in_place(tmp_path, extra):
    """Two resumes can give the file its old inode back, at the same or a larger size: the index must not keep
    the old lines (rewritten here in place, which keeps the inode for sure)."""
    path = tmp_path / "rollouts.jsonl"

    def write(tag: str, n: int) -> None:
        rows = [{"step": 1 + k // 4, "prompt": f"{tag}{k % 2}", "reward": float(k)} for k in range(n)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    write("A", 8)
    index = loading.RolloutIndex(path).refresh()
    write("B", 8 + extra)
    frame = index.refresh().frame()
    assert frame["prompt"].tolist() == [f"B{k % 2}" for k in range(8 + extra)]
    assert index.rows([7])[0]["prompt"] == "B1"


def test_rollout_index_search(runs_root):
    index = loading.RolloutIndex(runs_root / "toy/a/rollouts.jsonl").refresh()
    assert index.search("S2 G1").tolist() == [12, 13, 14, 15]  # case-insensitive
    assert index.search("<script>alert('x')").tolist() == [7, 15, 23]  # JSON-escaped characters found
    assert index.search("prompt 1", np.array([0, 4, 5])).tolist() == [4, 5]
    assert index.search("rewards").tolist() == []  # a key, not text
    turns = loading.RolloutIndex(runs_root / "toy/b/rollouts.jsonl").refresh()
    assert turns.search("board ok").tolist() == list(range(8))


def test_search_ignores_the_case_of_ascii_letters_only(tmp_path):
    """str.lower() lowers Σ at a word's end to ς: a needle written exactly as in the text was not found."""
    run = make_run(tmp_path, "toy/greek", "toy")
    run.log_rollouts([{"step": 1, "completion": "ΑΣΑ ΟΔΟΣ"}, {"step": 1, "completion": "Hello"}])
    index = loading.RolloutIndex(tmp_path / "toy/greek/rollouts.jsonl").refresh()
    assert index.search("ΑΣ").tolist() == [0] and index.search("HELLO").tolist() == [1]
    assert index.search("ασ").tolist() == []  # not ASCII: its case counts


def test_a_repeated_search_does_not_read_the_file_again(tmp_path, monkeypatch):
    """A page rerun searches again: kept matches are reused; appended lines are scanned, a rewrite drops them."""
    path = tmp_path / "rollouts.jsonl"

    def lines_of(tag: str, n: int) -> str:
        return "".join(
            json.dumps({"step": 1, "prompt": "p", "completion": f"{tag}{k % 2}"}) + "\n" for k in range(n)
        )

    path.write_text(lines_of("A", 6))
    index = loading.RolloutIndex(path).refresh()
    opened = []

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return open(*args, **kwargs)

    monkeypatch.setattr(loading, "open", counting_open, raising=False)
    assert index.search("a1").tolist() == [1, 3, 5] and opened
    opened.clear()
    assert index.search("a1").tolist() == [1, 3, 5]
    assert index.search("a1", np.array([0, 3, 4, 5])).tolist() == [3, 5]
    assert opened == []
    with path.open("a") as f:
        f.write(lines_of("A", 2))
    assert index.refresh().search("a1").tolist() == [1, 3, 5, 7]
    path.write_text(lines_of("B", 8))  # rewritten in place: same inode, same size
    assert index.refresh().search("a1").tolist() == []
    assert index.search("b0").tolist() == [0, 2, 4, 6]


def big_rows(n: int, chat_prompt_at: int | None = None) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": "hi"}] if i == chat_prompt_at else f"prompt {i % 7}"
        row = {
            "step": i // 50,
            "prompt": prompt,
            "completion": "x" * 300 + str(i),
            "reward": i % 3,
            "extra": [i],
        }
        if i % 2:
            row.update(group=i % 5, example_id=f"e{i}", advantage=0.5, finish_reason="stop")
        rows.append(row)
    return rows


@pytest.mark.parametrize("chat_prompt_at", [None, 3000])
def test_arrow_and_json_parsers_agree(tmp_path, monkeypatch, chat_prompt_at):
    """Over 1 MB the index parses with Arrow; a row Arrow cannot type sends the file to plain json."""
    path = tmp_path / "rollouts.jsonl"
    rows = big_rows(4000, chat_prompt_at)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert path.stat().st_size > loading._ARROW_MIN_BYTES
    fast = loading.RolloutIndex(path).refresh().frame()
    monkeypatch.setattr(loading, "_ARROW_MIN_BYTES", 1 << 40)
    plain = loading.RolloutIndex(path).refresh().frame()
    pd.testing.assert_frame_equal(fast, plain, check_categorical=False)
    assert fast["reward"].tolist() == [float(i % 3) for i in range(4000)]
    assert fast.loc[1, "example_id"] == "e1" and pd.isna(fast.loc[2, "example_id"])
    if chat_prompt_at is not None:
        assert fast.loc[chat_prompt_at, "prompt"] == '[{"role": "user", "content": "hi"}]'


def test_blank_or_stepless_line_in_a_big_file_is_reported(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    lines = [json.dumps(row) for row in big_rows(4000)]
    lines[1234] = '{"prompt": "no step"}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"rollouts.jsonl:1235: expected a JSON object with an int 'step'"):
        loading.RolloutIndex(path).refresh()


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    path.write_text('{"step": 1}\n{"step": 1, oops}\n')
    with pytest.raises(ValueError, match=r"rollouts.jsonl:2: malformed JSON"):
        loading.RolloutIndex(path).refresh()


def test_plots_render_png():
    line = pd.DataFrame(
        {
            "step": [1, 2, 1, 2],
            "value": [0.1, 0.2, 0.3, 0.1],
            "run": ["a", "a", "b", "b"],
            "metric": ["reward"] * 4,
        }
    )
    cells = sudoku.board_cells(sudoku_row())
    for plot in (
        plots.Plot("line", line, x="step", y="value", color="run", facet="metric"),
        plots.Plot("bar", line, x="run", y="value", color="step"),
        plots.Plot("grid", cells, x="col", y="row", color="kind", text="value", palette=sudoku.PALETTE),
        plots.Plot("grid", cells, x="col", y="row", color="order"),
    ):
        png = plot.png()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
        assert plot.chart().to_dict()["$schema"].startswith("https://vega.github.io/schema/vega-lite")


def test_cut_off_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert loading.cut_off_line(path) is None
    path.write_text('{"step": 1}\n')
    assert loading.cut_off_line(path) is None
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert loading.cut_off_line(path) == 3


@pytest.mark.parametrize("values", [[5.0, np.nan, 5.0], [np.nan, np.nan, np.nan]])
def test_grid_png_leaves_empty_cells_white_with_one_value(values):
    cells = pd.DataFrame({"row": [0, 0, 0], "col": [0, 1, 2], "order": values})
    image = plots.Plot("grid", cells, x="col", y="row", color="order")._grid_figure().axes[0].images[0]
    colours = image.get_array()[0].tolist()
    assert colours[1] == [1.0, 1.0, 1.0, 1.0]
    if not np.isnan(values[0]):
        assert colours[0] == colours[2] == list(plots.colormaps["viridis"](0.0))


def test_grid_png_ramps_from_the_scheme_start_at_the_lowest_value_to_its_end_at_the_highest():
    cells = pd.DataFrame({"row": [0, 0, 0], "col": [0, 1, 2], "order": [3.0, 1.0, 2.0]})
    image = plots.Plot("grid", cells, x="col", y="row", color="order")._grid_figure().axes[0].images[0]
    viridis = plots.colormaps["viridis"]
    assert image.get_array()[0].tolist() == [list(viridis(1.0)), list(viridis(0.0)), list(viridis(0.5))]


def test_grid_png_of_a_large_lattice_has_a_bounded_size():
    n = 60  # 0.4 inch per cell would be 2400 px
    grid = pd.DataFrame([(r, c, (r + c) % 2) for r in range(n) for c in range(n)], columns=["y", "x", "v"])
    png = plots.Plot("grid", grid, x="x", y="y", color="v").png()
    width, height = Image.open(io.BytesIO(png)).size
    assert 600 < min(width, height) <= max(width, height) <= plots.MAX_GRID_INCHES * 100 + 50


def test_sudoku_board_cells_by_hand():
    cells = sudoku.board_cells(sudoku_row()).set_index(["row", "col"])
    assert cells.loc[(0, 3)].to_dict() == {"value": 4, "kind": "correct", "order": 1, "solver_rank": 2}
    assert cells.loc[(0, 1)].to_dict() == {"value": 2, "kind": "correct", "order": 2, "solver_rank": 1}
    assert cells.loc[(1, 0)].to_dict() == {"value": 1, "kind": "wrong", "order": 3, "solver_rank": 3}
    assert cells.loc[(3, 3), "kind"] == "empty" and pd.isna(cells.loc[(3, 3), "order"])
    assert cells.loc[(2, 2)].to_dict()["kind"] == "given" and cells.loc[(2, 2), "value"] == 4
    # ranks (order, solver) over the 3 shared cells: (2,1), (1,2), (3,3) -> Pearson of ranks = 1/2
    assert sudoku.spearman(cells["order"], cells["solver_rank"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not a square board"):
        sudoku.parse_grid("123", "puzzle")


def test_app_tables():
    assert page_for_app("public-goods").module is public_goods and page_for_app("toy") is None
    lattice = public_goods.lattice_cells([[1, 1], [0, 0]])  # row 0 cooperates: not symmetric
    assert lattice[["row", "col", "strategy"]].values.tolist() == [
        [0, 0, "cooperator"],
        [0, 1, "cooperator"],
        [1, 0, "defector"],
        [1, 1, "defector"],
    ]
    wide = public_goods.lattice_cells([[0, 1, 0]])  # 1 row, 3 columns
    assert wide[["row", "col"]].values.tolist() == [[0, 0], [0, 1], [0, 2]]
    assert wide["strategy"].tolist() == ["defector", "cooperator", "defector"]
    rows = math_page.pass_at_k_rows(
        {
            "m1": ("grpo", {"pass_at_k": {"g": {"1": 0.2, "8": 0.5}}}),
            "m2": ("grpo", {"pass_at_k": {"g": {"1": 0.4, "8": 0.7}}}),
        }
    )
    table = math_page.by_algorithm(rows)
    assert table.loc[("grpo", "g")].to_dict() == pytest.approx({"pass@1": 0.3, "pass@8": 0.6, "runs": 2})
    mixed = math_page.pass_at_k_rows(  # evaluated at different k: each mean says how many runs it holds
        {
            "m1": ("grpo", {"pass_at_k": {"g": {"1": 0.2, "4": 0.5}}}),
            "m2": ("grpo", {"pass_at_k": {"g": {"1": 0.4, "8": 0.45}}}),
        }
    )
    assert math_page.by_algorithm(mixed).loc[("grpo", "g")].to_dict() == pytest.approx(
        {"pass@1": 0.3, "pass@4": 0.5, "pass@8": 0.45, "runs": 2, "runs@1": 2, "runs@4": 1, "runs@8": 1}
    )
    bias = debias.bias_table({"bias": {"age": {"before": 0.3, "after": 0.2}}})
    assert bias.values.tolist() == [["age", "before", 0.3], ["age", "after", 0.2]]
    accuracy = tcm.accuracy_rows({"t": {"accuracy_by_type": {"a": 0.5}, "count_by_type": {"a": 3}}})
    assert accuracy.values.tolist() == [["t", "a", 0.5, 3]]


def test_eval_values_that_are_not_numbers_are_left_out_of_the_app_pages():
    """eval.json stores a NaN as null; text, a bool or a k that is not a number are left out too."""
    rows = math_page.pass_at_k_rows(
        {"m": ("grpo", {"pass_at_k": {"g": {"1": None, "4": 0.5, "best": 0.9, "8": "0.7", "16": True}}})}
    )
    assert rows[["k", "pass"]].values.tolist() == [[4, 0.5]]
    accuracy = tcm.accuracy_rows({"t": {"accuracy_by_type": {"single": None, "fill": 0.25, "open": "x"}}})
    assert accuracy[["type", "accuracy"]].values.tolist() == [["fill", 0.25]]
    bias = debias.bias_table({"bias": {"age": {"before": None, "after": 0.2}, "race": {"before": "high"}}})
    assert bias.values.tolist() == [["age", "after", 0.2]]


def test_the_newest_run_prefers_the_outer_one_started_in_the_same_second(tmp_path, monkeypatch):
    from dashboards import state

    started = {"sudoku/s0": "2026-11-25T09:59:59+00:00", "sudoku/s1": "2026-11-25T10:00:00+00:00"}
    started["sudoku/s1/sft-random"] = started["sudoku/s1"]  # `sudoku train` builds its SFT stage inside
    for name, at in started.items():
        (tmp_path / name).mkdir(parents=True)
        config = {"app": "sudoku", "algorithm": "grpo", "started": at, "config": {}}
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("GRPO_SUITE_RUNS", str(tmp_path))
    assert state.newest(list(started)) == "sudoku/s1"


def test_serve_says_when_the_runs_folder_is_a_file(tmp_path):
    from dashboards.cli import ServeConfig, serve

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="config.json is not a directory"):
        serve(ServeConfig(runs=str(tmp_path / "config.json")))
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        serve(ServeConfig(runs=str(tmp_path / "nope")))


def test_runs_are_searched_down_to_max_depth_and_no_deeper(tmp_path):
    """A run MAX_DEPTH (4) folders down is listed; one a folder deeper is not."""
    assert loading.MAX_DEPTH == 4
    for run in ("a/b/c/d", "a/b/c/d/e", "x/y/z/w/v"):
        (tmp_path / run).mkdir(parents=True, exist_ok=True)
        (tmp_path / run / "config.json").write_text('{"app": "toy"}')
    assert loading.find_runs(tmp_path) == ["a/b/c/d"]


def test_unfinished_line_numbers_the_cut_off_line_from_one(tmp_path):
    """Two complete lines then a half-written one: the unfinished one is line 3 (as `cut_off_line` says)."""
    path = tmp_path / "rollouts.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    index = loading.RolloutIndex(path).refresh()
    assert len(index) == 2 and index.unfinished_line() is None
    path.write_text('{"step":1}\n{"step":2}\n{"st')
    index = loading.RolloutIndex(path).refresh()
    assert len(index) == 2 and index.unfinished_line() == 3 == loading.cut_off_line(path)


def test_only_the_last_searches_kept_matches_are_kept(tmp_path):
    """After SEARCHES_KEPT + 1 distinct needles the index keeps SEARCHES_KEPT, the oldest one evicted."""
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps({"step": 1, "completion": f"w{k}"}) + "\n" for k in range(9)))
    index = loading.RolloutIndex(path).refresh()
    needles = [f"w{k}" for k in range(9)]
    assert [index.search(n).tolist() for n in needles] == [[k] for k in range(9)]
    assert loading.SEARCHES_KEPT == 8
    assert list(index._searches) == needles[1:]


def test_line_png_puts_three_facets_on_a_two_by_two_grid():
    """3 panels at 2 per row need 2 rows: each axis sits on a 2 x 2 grid, the panels in order."""
    data = pd.DataFrame(
        {
            "step": [1, 2] * 3,
            "value": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            "metric": ["a"] * 2 + ["b"] * 2 + ["c"] * 2,
        }
    )
    fig = plots.Plot("line", data, x="step", y="value", facet="metric")._line_figure()
    assert [ax.get_title() for ax in fig.axes] == ["a", "b", "c"]
    assert [ax.get_subplotspec().get_geometry() for ax in fig.axes] == [(2, 2, k, k) for k in range(3)]


def test_faceted_line_chart_gives_each_facet_its_own_y_scale():
    data = pd.DataFrame(
        {"step": [1, 2, 1, 2], "value": [0.1, 0.2, 30.0, 40.0], "metric": ["a", "a", "b", "b"]}
    )
    spec = plots.Plot("line", data, x="step", y="value", facet="metric").chart().to_dict()
    assert spec["resolve"] == {"scale": {"y": "independent"}}


def test_grid_png_leaves_cells_without_a_row_white():
    """Only (0, 0) and (1, 1) are given: the others are the white background, whatever the values."""
    cells = pd.DataFrame({"row": [0, 1], "col": [0, 1], "v": [1.0, 2.0]})
    image = (
        plots.Plot("grid", cells, x="col", y="row", color="v")._grid_figure().axes[0].images[0].get_array()
    )
    viridis = plots.colormaps["viridis"]
    assert image[0, 1].tolist() == image[1, 0].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert image[0, 0].tolist() == list(viridis(0.0)) and image[1, 1].tolist() == list(viridis(1.0))


def test_grid_png_draws_a_value_missing_from_the_palette_white():
    cells = pd.DataFrame({"row": [0, 0], "col": [0, 1], "kind": ["a", "b"]})
    plot = plots.Plot("grid", cells, x="col", y="row", color="kind", palette={"a": "#ff0000"})
    image = plot._grid_figure().axes[0].images[0].get_array()
    assert image[0].tolist() == [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]


def test_bar_png_centres_each_categorys_bars_on_its_tick():
    """2 series x 2 categories: width 0.8 / 2 = 0.4; series 0 centred 0.2 left of each tick, series 1 0.2
    right, so the pair is centred on the tick."""
    data = pd.DataFrame(
        {"cat": ["x", "y", "x", "y"], "value": [1.0, 2.0, 3.0, 4.0], "s": ["p", "p", "q", "q"]}
    )
    ax = plots.Plot("bar", data, x="cat", y="value", color="s")._bar_figure().axes[0]
    bars = [
        [(r.get_x() + r.get_width() / 2, r.get_width(), r.get_height()) for r in c] for c in ax.containers
    ]
    assert np.allclose(bars, [[(-0.2, 0.4, 1.0), (0.8, 0.4, 2.0)], [(0.2, 0.4, 3.0), (1.2, 0.4, 4.0)]])


def test_the_newest_run_is_the_one_started_last_across_zone_offsets(tmp_path, monkeypatch):
    """A run written at 10:30+02:00 (08:30 UTC) started before one written at 09:00+00:00; as text it sorted
    after it. A start time that is not a time counts as oldest."""
    from dashboards import state

    started = {"a": "2026-11-25T10:30:00+02:00", "b": "2026-11-25T09:00:00+00:00", "c": "yesterday"}
    for name, at in started.items():
        (tmp_path / name).mkdir()
        config = {"app": "math", "algorithm": "grpo", "started": at, "config": {}}
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("GRPO_SUITE_RUNS", str(tmp_path))
    assert state.newest(["a", "b", "c"]) == "b"
    assert state.newest(["a", "c"]) == "a"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"step": 2, "reward": "0.7"}', "metric 'reward' must be a finite number or null, got '0.7'"),
        ('{"step": 2, "entropy": "high"}', "metric 'entropy' must be a finite number or null, got 'high'"),
        ('{"step": 2, "reward": NaN}', "metric 'reward' must be a finite number or null, got nan"),
        ('{"step": 2, "reward": 1e400}', "metric 'reward' must be a finite number or null, got inf"),
        ('{"step": 2, "reward": [1]}', r"metric 'reward' must be a finite number or null, got \[1\]"),
        ('{"step": 123456789012345678901234567890}', "'step' must be an int from 0 to 9223372036854775807"),
        ('{"step": -1}', "'step' must be an int from 0 to 9223372036854775807, got -1"),
    ],
)
def test_a_metric_that_is_not_a_finite_number_names_its_line(tmp_path, line, message):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5, "ok": true}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"metrics.jsonl:2: {message}"):
        loading.read_metrics(tmp_path)


def test_metrics_keep_nulls_and_bools_as_written(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "reward": null, "ok": true}\n{"step": 2, "reward": 3}\n'
    )
    frame = loading.read_metrics(tmp_path)
    assert frame["step"].tolist() == [1, 2]
    assert np.isnan(frame["reward"][0]) and frame["reward"][1] == 3


ROLLOUT_TYPE_ERRORS = [
    ({"group": "zero"}, "'group' must be an int or null, got 'zero'"),
    ({"group": 1.5}, "'group' must be an int or null, got 1.5"),
    ({"group": True}, "'group' must be an int or null, got True"),
    ({"group": 10**30}, "'group' must be an int or null, got 1000000000000000000000000000000"),
    ({"reward": "0.5"}, "'reward' must be a finite number or null, got '0.5'"),
    ({"reward": [1]}, r"'reward' must be a finite number or null, got \[1\]"),
    ({"advantage": {"a": 1}}, r"'advantage' must be a finite number or null, got \{'a': 1\}"),
    ({"reward": float("nan")}, "'reward' must be a finite number or null, got nan"),
    ({"step": -3}, "'step' must be an int from 0 to 9223372036854775807, got -3"),
    ({"rewards": "bad"}, "'rewards' must be an object of reward components, got 'bad'"),
]


@pytest.mark.parametrize("fields, message", ROLLOUT_TYPE_ERRORS)
def test_a_rollout_field_of_the_wrong_type_names_its_line(tmp_path, fields, message):
    path = tmp_path / "rollouts.jsonl"
    rows = [{"step": 1, "group": 0, "reward": 1.0, "rewards": {"a": 1.0}}] * 2
    path.write_text("".join(json.dumps(row) + "\n" for row in [*rows, {**rows[0], **fields}]))
    with pytest.raises(ValueError, match=rf"rollouts.jsonl:3: {message}"):
        loading.RolloutIndex(path).refresh()


@pytest.mark.parametrize("fields, message", ROLLOUT_TYPE_ERRORS)
def test_a_rollout_field_of_the_wrong_type_in_a_big_file_names_its_line(tmp_path, fields, message):
    """Arrow parses a big file; what it cannot type or lets through goes to plain json, which names the line.
    `rewards`, not an indexed column, is checked when its line is read to be shown."""
    path = tmp_path / "rollouts.jsonl"
    rows = big_rows(4000)
    rows[1234] = {**rows[1234], **fields}
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=rf"rollouts.jsonl:1235: {message}"):
        index = loading.RolloutIndex(path).refresh()
        index.rows([1234])
