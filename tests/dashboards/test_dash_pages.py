"""Every dashboard page under Streamlit's AppTest on the runs folder of conftest.py: the widgets and values
shown, URL parameters (paths outside the folder refused), and model text shown as text only."""

import codecs
import io
import json

import pandas as pd
import pyarrow as pa
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from dashboards import loading, state
from dashboards.views import public_goods

from .conftest import SCRIPT, make_run, metrics_row, sudoku_row, toy_rollouts

TIMEOUT = 60


def page_app(module: str):
    from importlib import import_module

    import_module(f"dashboards.views.{module}").render()


def open_page(module: str, **query) -> AppTest:
    at = AppTest.from_function(page_app, args=(module,), default_timeout=TIMEOUT)
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def charts(at: AppTest) -> list[dict]:
    """The Vega-Lite specs of the page's charts (AppTest has no chart accessor: read the protos)."""
    return [json.loads(e.proto.spec) for e in at.get("vega_lite_chart")]


def chart_labels(at: AppTest, index: int) -> list[str]:
    """The `label` column of the data behind the page's chart `index` (sent as Arrow, not in the spec)."""
    (dataset,) = at.get("vega_lite_chart")[index].proto.datasets
    return pa.ipc.open_stream(dataset.data.data).read_all().column("label").to_pylist()


def download_labels(at: AppTest) -> list[str]:
    return [e.proto.label for e in at.get("download_button")]


def chart_data(at: AppTest, index: int) -> pd.DataFrame:
    """The data behind the page's chart `index` (sent as Arrow, not in the spec)."""
    (dataset,) = at.get("vega_lite_chart")[index].proto.datasets
    return pa.ipc.open_stream(dataset.data.data).read_all().to_pandas()


@pytest.fixture
def downloads(monkeypatch) -> dict[str, tuple[str, object]]:
    """{key: (file name, data)} of the download buttons the pages draw (AppTest cannot click one: a deferred
    download's data is the callable a click would run)."""
    drawn = {}
    button = st.download_button

    def record(label, data, file_name=None, *args, key=None, **kwargs):
        drawn[key] = (file_name, data)
        return button(label, data, file_name, *args, key=key, **kwargs)

    monkeypatch.setattr(st, "download_button", record)
    return drawn


def csv_download(downloads: dict, key: str) -> tuple[str, str]:
    """The file name and CSV text of download button `key`, which opens with UTF-8's byte-order mark (for
    Excel)."""
    name, data = downloads[key]
    data = data() if callable(data) else data
    assert data.startswith(codecs.BOM_UTF8), data[:8]
    return name, data.decode("utf-8-sig")


def set_started(root, name: str, started: str) -> None:
    path = root / name / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"started": started}))


def test_app_entry_shows_the_runs_page(runs_root):
    at = AppTest.from_file("../../dashboards/app.py", default_timeout=TIMEOUT).run()
    assert not at.exception
    assert texts(at.title) == ["Runs"]
    assert "toy/a" in at.dataframe[0].value["run"].tolist()
    assert str(runs_root.resolve()) in texts(at.sidebar.code)


def test_runs_page_lists_runs_and_diffs_configs(runs_root):
    at = open_page("runs", run=["toy/a", "toy/b", "toy/c"])
    table = at.dataframe[0].value.set_index("run")
    assert len(table) == 10
    assert table.loc["toy/a", ["app", "algorithm", "status", "step"]].tolist() == [
        "toy",
        "grpo",
        "finished",
        3,
    ]
    assert table.loc["toy/b", "status"] == "running" and table.loc["toy/c", "status"] == "failed"
    assert table.loc["toy/a", "reward (last step)"] == pytest.approx(0.3)
    assert at.multiselect(key="runs_pick").value == ["toy/a", "toy/b", "toy/c"]
    diff = at.dataframe[1].value
    assert diff.loc["learning_rate"].tolist() == ["0.001", "0.01", "0.001"]
    assert "CUDA out of memory <b>x</b>" in texts(at.code)  # the error as text
    assert "Live" in texts(at.subheader) and at.toggle(key="runs_live").value is True
    assert "Download CSV" in download_labels(at)
    # status filter
    at.multiselect(key="runs_status").set_value(["failed"]).run()
    assert at.dataframe[0].value["run"].tolist() == ["toy/c"]


def test_a_run_with_a_malformed_metrics_line_keeps_its_row_with_the_error(runs_root):
    run = make_run(runs_root, "lr:1e-3/bad", "toy")  # ':' is a plain character in a run name
    run.log_metrics(1, {"reward": 0.5})
    with run.metrics_path.open("a") as f:
        f.write("{oops\n")
    run.log_metrics(2, {"reward": 0.6})
    run.set_status("running", step=2)
    at = open_page("runs", run="lr:1e-3/bad")
    table = at.dataframe[0].value.set_index("run")
    assert len(table) == 11 and table.loc["toy/a", "reward (last step)"] == pytest.approx(0.3)
    assert table.loc["lr:1e-3/bad", ["app", "status"]].tolist() == ["toy", "running"]
    assert table.loc["lr:1e-3/bad", "error"].endswith(
        "metrics.jsonl:2: malformed JSON line: "
        + ("Expecting property name enclosed in double quotes: line 1 column 2 (char 1)")
    )
    assert table["error"].drop("lr:1e-3/bad").isna().all()
    assert texts(at.error) == ["Cannot read the metrics of lr:1e-3/bad:"]  # the live view
    assert table.loc["lr:1e-3/bad", "error"] in texts(at.code)


@pytest.mark.parametrize("status", ["finished", "failed", "running"])
def test_a_cut_off_last_metrics_line_is_reported_unless_the_run_is_running(runs_root, status):
    run = make_run(runs_root, "toy/killed", "toy")
    run.log_metrics(1, {"reward": 0.5})
    with run.metrics_path.open("a") as f:
        f.write('{"step": 2, "rew')
    run.set_status(status, step=1, error="killed" if status == "failed" else None)
    at = open_page("curves", run="toy/killed")
    warning = f"`{run.metrics_path.resolve()}`: line 2 has no newline (cut off by a killed process) and is "
    warning += "left out (a resumed run rewrites it)."
    assert texts(at.warning) == ([] if status == "running" else [warning])
    assert at.dataframe[0].value["raw"].tolist() == [0.5]


@pytest.mark.parametrize("status", ["finished", "running"])
def test_a_cut_off_last_rollouts_line_is_reported_unless_the_run_is_running(runs_root, status):
    run = make_run(runs_root, "toy/killed", "toy")
    run.log_rollouts(toy_rollouts(1)[:2])
    with run.rollouts_path.open("a") as f:
        f.write('{"step": 2, "compl')
    run.set_status(status, step=1)
    at = open_page("rollouts", run="toy/killed")
    warning = f"`{run.rollouts_path.resolve()}`: line 3 has no newline (cut off by a killed process) and is "
    warning += "left out (a resumed run rewrites it)."
    assert texts(at.warning) == ([] if status == "running" else [warning])
    assert "2 of 2 rollouts match" in texts(at.caption)


def test_runs_page_single_run_shows_config_and_eval(runs_root):
    at = open_page("runs", run="toy/a")
    config = at.dataframe[1].value
    assert config.loc["learning_rate", "value"] == "0.001" and config.loc["app", "value"] == "toy"
    assert at.dataframe[2].value.loc["accuracy", "value"] == "0.75"
    assert "Live" not in texts(at.subheader)


@pytest.mark.parametrize(
    "name,reason", [("../../etc", "'..' is not allowed"), ("/etc", "absolute paths are not allowed")]
)
@pytest.mark.parametrize("page", ["runs", "rollouts", "curves"])
def test_path_traversal_in_the_url_is_refused(runs_root, page, name, reason):
    at = open_page(page, run=name)
    assert texts(at.error)[0] == f"Refused the run path in the URL: {reason}."
    assert name in texts(at.code)  # echoed as text
    assert at.query_params["run"] != name  # replaced by a valid choice


def test_curves_page_defaults_and_smoothing(runs_root):
    at = open_page("curves", run=["toy/a", "toy/b"])
    metrics = at.multiselect(key="curves_metrics")
    assert metrics.value == [
        "reward",
        "reward/correct",
        "reward/format",
        "zero_spread_frac",
        "kl",
        "entropy",
        "clip/frac",
    ]
    assert "loss" in metrics.options and "reward/format/failures" in metrics.options
    (spec,) = charts(at)
    assert spec["facet"]["field"] == "metric" and spec["spec"]["encoding"]["color"]["field"] == "run"
    assert download_labels(at) == ["Download PNG", "Download CSV"]
    metrics.set_value(["reward"])
    at.slider(key="curves_smoothing").set_value(0.5).run()
    data = at.dataframe[0].value
    a = data[data["run"] == "toy/a"]
    assert a["raw"].tolist() == pytest.approx([0.1, 0.2, 0.3])
    # debiased EMA by hand: sum of 0.5^k x_(t-k) / sum of 0.5^k
    assert a["value"].tolist() == pytest.approx(
        [0.1, (0.5 * 0.1 + 0.2) / 1.5, (0.25 * 0.1 + 0.5 * 0.2 + 0.3) / 1.75]
    )
    assert data[data["run"] == "toy/b"]["value"].tolist() == pytest.approx([0.1])


def test_rollouts_page_filters_pages_and_groups(runs_root):
    at = open_page("rollouts", run="toy/a")
    assert "24 of 24 rollouts match" in texts(at.caption)
    assert at.slider(key="ro_steps").value == (1, 3)
    at.slider(key="ro_steps").set_value((2, 3)).run()
    assert "16 of 24 rollouts match" in texts(at.caption)
    at.selectbox(key="ro_prompt").set_value("prompt 1").run()
    assert "8 of 24 rollouts match" in texts(at.caption)
    at.slider(key="ro_reward").set_value((1.4, 1.75)).run()  # rewards 1.5, 1.75 at steps 2, 3
    assert "4 of 24 rollouts match" in texts(at.caption)
    table = at.dataframe[0].value
    assert table["line"].tolist() == [14, 15, 22, 23]
    assert table["reward"].tolist() == [1.5, 1.75, 1.5, 1.75]
    assert table["r:format"].tolist() == [0.5, 0.75, 0.5, 0.75]
    at.text_input(key="ro_search").set_value("S3 G1 K3").run()
    assert "1 of 24 rollouts match" in texts(at.caption)
    # the group of line 23: its 4 completions, side by side, with the script as plain text
    codes = texts(at.code)
    assert codes[0] == "prompt 1"
    assert codes[1:] == [f"answer s3 g1 k{k}" for k in range(3)] + [f"answer s3 g1 k3 {SCRIPT}"]
    assert not any(SCRIPT in m for m in texts(at.markdown))
    components = at.dataframe[1].value
    assert components.values.tolist() == [["correct", 1.0], ["format", 0.0]]


def test_prompts_sharing_a_long_template_are_told_apart_by_the_picker(runs_root):
    """A chat template's system prompt is longer than a label: each prompt is labelled by what follows it,
    and picking one shows that prompt's rollouts (equal labels would all show the last prompt's)."""
    system = (
        "<|im_start|>system\n你是一位中医专家，请先思考再回答，把答案放在<answer></answer>中。" * 2 + "\n"
    )
    questions = ["气血不足的症状是什么？", "脾虚湿盛如何治疗？", "肝火旺的表现？"]
    rows = [
        {"step": 1, "group": g, "prompt": system + q, "completion": f"g{g} k{k}", "reward": k / 4}
        for g, q in enumerate(questions)
        for k in range(2)
    ]
    make_run(runs_root, "tcm/t", "tcm").log_rollouts(rows)
    at = open_page("rollouts", run="tcm/t")
    picker = at.selectbox(key="ro_prompt")
    assert picker.format_func(picker.options[1]) == "…" + questions[0]
    assert len({picker.format_func(option) for option in picker.options}) == 4
    picker.select_index(1).run()
    assert at.dataframe[0].value["completion"].tolist() == ["g0 k0", "g0 k1"]


def test_prompt_labels_show_where_prompts_with_a_long_common_stem_differ():
    """Beyond the text all prompts share, groups of prompts may share a stem longer than a label: each is
    labelled from the words before it differs from its nearest, not numbered "… (2)", "… (3)" (which also
    took a rescan of every label per prompt: 16 s for 2,000 prompts)."""
    from dashboards.views.rollouts import prompt_labels

    stem = "Ann has many apples and wants to know how many she will have after these steps are done: "
    prompts = [f"{stem}add {i}" for i in range(2000)] + ["What is 2 + 2?"]  # nothing shared by all
    labels = prompt_labels(prompts)
    assert len(set(labels.values())) == 2001 and not any(label.endswith(")") for label in labels.values())
    assert labels[f"{stem}add 7"] == "…steps are done: add 7" and labels["What is 2 + 2?"] == "What is 2 + 2?"
    assert all(len(label) <= 81 for label in labels.values())


def test_rollouts_with_a_null_reward_are_shown_until_the_reward_range_is_narrowed(runs_root):
    rows = toy_rollouts(1)
    rows[0]["reward"] = None  # a NaN reward is logged as null
    make_run(runs_root, "toy/n", "toy").log_rollouts(rows)
    at = open_page("rollouts", run="toy/n")
    assert "8 of 8 rollouts match" in texts(at.caption)
    at.slider(key="ro_reward").set_value((0.3, 1.75)).run()
    assert "6 of 8 rollouts match" in texts(at.caption)


def test_rollouts_page_pagination(runs_root):
    at = open_page("rollouts", run="toy/a")
    at.selectbox(key="ro_page_size").set_value(25).run()
    assert at.number_input(key="ro_page").label == "Page (of 1)"
    assert len(at.dataframe[0].value) == 24
    at.slider(key="ro_steps").set_value((1, 1)).run()
    assert at.dataframe[0].value["line"].tolist() == list(range(8))
    assert "Download all matching rollouts (CSV)" in download_labels(at)


def test_the_finish_reason_is_shown_as_text(runs_root):
    rows = toy_rollouts(1)
    for row in rows:
        row["finish_reason"] = SCRIPT
    make_run(runs_root, "toy/f", "toy").log_rollouts(rows)
    at = open_page("rollouts", run="toy/f")
    assert texts(at.text).count(f"finish: {SCRIPT}") == 4
    assert not any(SCRIPT in c for c in texts(at.caption))


def test_rollouts_page_marks_observations_of_multi_turn_runs(runs_root):
    at = open_page("rollouts", run="toy/b")
    captions = texts(at.caption)
    assert captions.count("2. observation (environment)") == 4  # group 0's four rollouts
    assert captions.count("1. model turn") == 4
    assert texts(at.code)[1:4] == ["move 0", "board ok", "final 0"]


def test_sudoku_page(runs_root):
    # a pipeline, its SFT stage and an evaluation log no rollouts: only GRPO runs are offered
    for name, algorithm in (
        ("sudoku/pipe", "pipeline"),
        ("sudoku/pipe/sft-random", "sft-random"),
        ("sudoku/ev", "eval"),
    ):
        make_run(runs_root, name, "sudoku", algorithm=algorithm)
    at = open_page("sudoku")
    assert at.selectbox(key="sudoku_run").options == ["sudoku/s1"]
    values = {m.label: m.value for m in at.metric}
    assert values == {
        "Empty cells": "4",
        "Filled correctly": "2",
        "Errors": "1",
        "Order vs solver (Spearman)": "+0.50",
    }
    assert len(charts(at)) == 2
    cells = at.dataframe[0].value.set_index(["row", "col"])
    assert cells.loc[(1, 0), "kind"] == "wrong"
    # the model board's labels: values, then the emission rank (givens blank), then values over a ramp
    assert chart_labels(at, 0)[:5] == ["1", "2", "3", "4", "1"]
    at.radio(key="sudoku_mode").set_value("emission order (numbers)").run()
    assert chart_labels(at, 0)[:5] == ["", "2", "", "1", "3"]
    at.radio(key="sudoku_mode").set_value("emission order (colour ramp)").run()
    assert chart_labels(at, 0)[:5] == ["1", "2", "3", "4", "1"]
    assert charts(at)[0]["layer"][0]["encoding"]["color"]["field"] == "order"
    assert chart_labels(at, 1)[:5] == ["", "1", "", "2", "3"]  # the solver's order


def test_public_goods_page(runs_root):
    at = open_page("public_goods")
    table = at.dataframe[0].value
    assert table["cooperation"].tolist() == [0.1, 0.6, 0.9] and table["r"].tolist() == [3.0, 4.0, 5.0]
    assert at.metric[0].value == "75.0%"  # the last snapshot: 3 of 4 cooperate
    at.select_slider(key="pgg_snapshot").set_value(0).run()
    assert at.metric[0].value == "25.0%"
    assert len(charts(at)) == 2


def test_debias_page(runs_root):
    at = open_page("debias")
    wide = at.dataframe[0].value
    assert wide.loc["gender", "change"] == pytest.approx(-0.3) and wide.loc["age", "before"] == 0.3
    fair, unfair = at.dataframe[1].value, at.dataframe[2].value
    assert fair["response"].tolist() == ["fair one", "meh", SCRIPT]
    assert unfair["response"].tolist()[0] == SCRIPT
    at.selectbox(key="debias_stage").set_value("before").run()
    assert at.dataframe[1].value["response"].tolist() == ["meh"]


@pytest.mark.parametrize(
    "responses, message",
    [
        (None, "No `responses` in debias/p's eval.json: `debias eval` writes them"),
        ([], "No `responses` in debias/p's eval.json: `debias eval` writes them"),
        (
            [{"category": "age", "response": "x"}],
            "The `responses` in debias/p's eval.json have no `bias` values",
        ),
    ],
)
def test_debias_page_says_when_responses_are_missing(runs_root, responses, message):
    """A `debias pipeline` run's own eval.json has `bias` only: the page says so under the bias scores."""
    results = {"bias": {"gender": {"before": 0.4, "after": 0.1}}}
    if responses is not None:
        results["responses"] = responses
    make_run(runs_root, "debias/p", "debias").write_eval(results)
    at = open_page("debias", run="debias/p")
    assert len(at.dataframe) == 1  # the bias table, no response tables
    (info,) = texts(at.info)
    assert info.startswith(message)


def test_math_page(runs_root):
    at = open_page("math_page")
    by_algorithm = at.dataframe[0].value
    assert by_algorithm.loc[("grpo", "gsm8k"), "pass@1"] == pytest.approx(0.3)
    assert by_algorithm.loc[("gtpo", "gsm8k"), "pass@8"] == pytest.approx(0.8)
    assert by_algorithm.loc[("grpo", "gsm8k"), "runs"] == 2
    assert len(at.dataframe[1].value) == 3


def test_math_runs_of_the_large_model_are_averaged_apart(runs_root):
    """`math compare`'s grpo_large arm is GRPO on the large model: averaged with the small model's GRPO,
    the mean had described neither."""
    for name, size, p1 in (("math/s", "small", 0.2), ("math/l", "large", 0.6)):
        make_run(runs_root, name, "math", size=size).write_eval({"pass_at_k": {"gsm8k": {"1": p1}}})
    by_algorithm = open_page("math_page").dataframe[0].value
    assert by_algorithm.loc[("grpo (large)", "gsm8k"), "pass@1"] == pytest.approx(0.6)
    assert by_algorithm.loc[("grpo", "gsm8k"), "pass@1"] == pytest.approx((0.2 + 0.2 + 0.4) / 3)
    assert by_algorithm.loc[("grpo", "gsm8k"), "runs"] == 3


def test_tcm_page(runs_root):
    at = open_page("tcm")
    wide = at.dataframe[0].value
    assert wide["tcm/t1"].to_dict() == {"multi": 0.25, "single": 0.5}
    assert wide["tcm/t1 n"].to_dict() == {"multi": 4, "single": 10}  # count_by_type beside them


def test_app_page_without_runs_says_so(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("GRPO_SUITE_RUNS", str(tmp_path / "empty"))
    at = open_page("tcm")
    assert texts(at.info) == [f"No runs of app tcm under {(tmp_path / 'empty').resolve()} yet."]


def test_curves_name_a_run_whose_metrics_cannot_be_read_and_draw_the_others(runs_root):
    """One damaged metrics.jsonl had taken every selected run's curves down with it."""
    with (runs_root / "toy" / "b" / "metrics.jsonl").open("a") as f:
        f.write("{broken\n")
    at = open_page("curves", run=["toy/a", "toy/b"])
    assert "Cannot read the metrics of toy/b:" in texts(at.error)
    assert at.multiselect(key="curves_metrics").value  # toy/a's curves are there


def test_rollouts_without_group_or_prompt_are_shown(runs_root):
    run = make_run(runs_root, "toy/bare", "toy")
    run.log_rollouts(
        [{"step": 1, "completion": "aa", "reward": 1.0}, {"step": 1, "completion": "b", "reward": 0.0}]
    )
    at = open_page("rollouts", run="toy/bare")  # an IndexError before: NaN prompts matched no row
    assert "aa" in texts(at.code)


def test_separate_runs_at_several_r_form_one_curve_per_method(runs_root):
    for r, cooperation in ((3.5, 0.2), (4.5, 0.8)):  # `public-goods run`s: a final_cooperation each
        make_run(runs_root, f"public-goods/r{r}", "public-goods").write_eval(
            {
                "final_cooperation": cooperation,
                "cooperation_vs_r": [{"r": r, "cooperation": cooperation, "label": "fermi"}],
            }
        )
    make_run(runs_root, "public-goods/s1", "public-goods").write_eval(  # a sweep of one grid point
        {"cooperation_vs_r": [{"r": 4.0, "cooperation": 0.5, "label": "fermi"}]}
    )
    at = open_page("public_goods", run=["public-goods/r3.5", "public-goods/r4.5", "public-goods/s1"])
    table = at.dataframe[0].value
    assert table["label"].tolist() == ["fermi", "fermi", "public-goods/s1 · fermi"]
    assert table["r"].tolist() == [3.5, 4.5, 4.0]


@pytest.mark.parametrize(
    "status, reason",
    [('{"status": "runn', "malformed JSON"), ("[]", "expected a JSON object, got list")],
)
def test_a_run_with_an_unreadable_status_keeps_its_row_and_the_pages_work(runs_root, status, reason):
    """Picking the newest run, or the runs of an app, read every run's status.json and crashed on one."""
    bad = make_run(runs_root, "math/bad", "math")
    bad.status_path.write_text(status)
    at = open_page("runs")
    error = at.dataframe[0].value.set_index("run").loc["math/bad", "error"]
    assert error.startswith(f"{bad.status_path.resolve()}: {reason}")
    at = open_page("runs", run="math/bad")
    assert "Cannot read math/bad:" in texts(at.error) and error in texts(at.code)
    for page in ("math_page", "rollouts"):
        assert not open_page(page).error


def test_a_run_deleted_while_the_run_list_is_cached_does_not_crash_the_pages(runs_root, monkeypatch):
    from dashboards import state

    listed = state.run_names
    monkeypatch.setattr(state, "run_names", lambda root: [*listed(root), "math/gone"])
    at = open_page("runs")
    assert at.dataframe[0].value.set_index("run").loc["math/gone", "error"].startswith("no run 'math/gone'")
    assert len(open_page("math_page").dataframe[1].value) == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"pass_at_k": ', "malformed JSON"),
        ("[]", "expected a JSON object, got list"),
    ],
)
def test_an_unreadable_eval_json_is_named_and_the_other_runs_shown(runs_root, text, message):
    bad = make_run(runs_root, "math/bad", "math")
    bad.eval_path.write_text(text)
    at = open_page("math_page")
    assert texts(at.error) == ["Cannot read math/bad:"]
    assert texts(at.code)[0].startswith(f"{bad.eval_path.resolve()}: {message}")
    assert len(at.dataframe[1].value) == 3
    at = open_page("runs", run="math/bad")
    assert texts(at.error) == ["Cannot read the eval.json of math/bad:"]


def test_pass_at_k_entries_that_are_not_dicts_are_skipped(runs_root):
    make_run(runs_root, "math/flat", "math").write_eval({"pass_at_k": {"gsm8k": 0.3, "aime": {"1": 0.1}}})
    make_run(runs_root, "math/number", "math").write_eval({"pass_at_k": 5})
    at = open_page("math_page")
    assert not at.exception
    assert at.dataframe[1].value.loc[("math/flat", "grpo", "aime"), "pass@1"] == pytest.approx(0.1)
    assert len(at.dataframe[1].value) == 4


@pytest.mark.parametrize("page", ["rollouts", "sudoku"])
def test_a_malformed_rollouts_line_is_reported(runs_root, page):
    run = make_run(runs_root, "sudoku/bad", "sudoku")
    run.log_rollouts(toy_rollouts(1))
    with run.rollouts_path.open("a") as f:
        f.write("{oops\n")
    at = open_page(page, run="sudoku/bad")
    assert texts(at.error) == ["Cannot read the rollouts of sudoku/bad:"]
    (code,) = texts(at.code)
    assert code.startswith(f"{run.rollouts_path.resolve()}:9: malformed JSON line: ")


def test_a_malformed_sudoku_board_is_reported(runs_root):
    make_run(runs_root, "sudoku/bad", "sudoku").log_rollouts([{**sudoku_row(), "puzzle": 7}])
    at = open_page("sudoku", run="sudoku/bad")
    assert texts(at.error) == ["Cannot draw the board of line 0:"]
    assert texts(at.code)[0] == "sudoku field 'puzzle': expected a string or a list of rows, got int"


def test_a_solver_order_off_the_board_is_reported(runs_root):
    make_run(runs_root, "sudoku/bad", "sudoku").log_rollouts(
        [{**sudoku_row(), "solver_order": [[0, 1], [4, 0]]}]
    )
    at = open_page("sudoku", run="sudoku/bad")
    assert texts(at.error) == ["Cannot draw the board of line 0:"]
    assert texts(at.code)[0] == "sudoku field 'solver_order': cell [4, 0] is off the 4x4 board"


@pytest.mark.parametrize(
    "field, value, shape",
    [
        ("emitted", [[0, 1, None]], "[row, col, value]"),  # a null cell had ended the page (TypeError)
        ("emitted", 5, "[row, col, value]"),
        ("emitted", [[0, "x", 2]], "[row, col, value]"),
        ("solver_order", [[0, None]], "[row, col]"),
        ("solver_order", [[0, 1, 2]], "[row, col]"),
    ],
)
def test_emissions_or_a_solver_order_that_are_not_integer_cells_are_reported(runs_root, field, value, shape):
    make_run(runs_root, "sudoku/bad", "sudoku").log_rollouts([{**sudoku_row(), field: value}])
    at = open_page("sudoku", run="sudoku/bad")
    assert not at.exception, [e.value for e in at.exception]
    assert texts(at.error) == ["Cannot draw the board of line 0:"]
    assert texts(at.code)[0] == f"sudoku field {field!r}: expected a list of {shape} integers"


def test_a_cooperation_point_without_a_number_for_r_is_left_out(runs_root):
    """A point without `r` raised a KeyError that ended the page."""
    points = [{"label": "fermi", "r": 4.0, "cooperation": 0.5}, {"label": "fermi", "cooperation": 0.7}]
    points.append({"label": "fermi", "r": "5", "cooperation": 0.9})
    points.append({"label": "fermi", "r": True, "cooperation": 0.9})  # a bool is not r = 1
    make_run(runs_root, "public-goods/odd", "public-goods").write_eval({"cooperation_vs_r": points})
    at = open_page("public_goods", run="public-goods/odd")
    assert not at.exception and texts(at.error) == []
    frame = public_goods.cooperation_curves({"odd": {"cooperation_vs_r": points}})
    assert frame[["r", "cooperation"]].values.tolist() == [[4.0, 0.5]]


def test_a_snapshot_without_a_grid_is_reported(runs_root):
    make_run(runs_root, "public-goods/bad", "public-goods").write_eval({"snapshots": [{"step": 0, "r": 4.0}]})
    at = open_page("public_goods", run="public-goods/bad")
    assert texts(at.error) == ["Cannot draw the snapshot step 0 · r 4.0 of public-goods/bad:"]
    assert texts(at.code) == ["public goods snapshot: grid must be a list of rows, got NoneType"]


def test_the_live_chart_and_the_reward_components_have_downloads(runs_root):
    at = open_page("runs", run="toy/b")  # running: the live view
    assert "Live" in texts(at.subheader) and download_labels(at).count("Download PNG") == 1
    at = open_page("rollouts", run="toy/a")
    assert download_labels(at).count("Download CSV") == 1 + 4  # the page, each completion's components


UNREADABLE_EVAL = pytest.mark.parametrize(
    "text, message", [('{"bias": ', "malformed JSON"), ("[]", "expected a JSON object, got list")]
)


def assert_named(at: AppTest, name: str, bad, message: str) -> None:
    assert texts(at.error) == [f"Cannot read {name}:"]
    assert texts(at.code)[0].startswith(f"{bad.eval_path.resolve()}: {message}")


@UNREADABLE_EVAL
def test_public_goods_names_an_unreadable_eval_json_and_shows_the_other_runs(runs_root, text, message):
    bad = make_run(runs_root, "public-goods/bad", "public-goods")
    bad.eval_path.write_text(text)
    at = open_page("public_goods", run=["public-goods/bad", "public-goods/p1"])
    assert_named(at, "public-goods/bad", bad, message)
    assert at.dataframe[0].value["run"].unique().tolist() == ["public-goods/p1"]
    assert at.selectbox(key="pgg_snapshot_run").options == ["public-goods/p1"]


@UNREADABLE_EVAL
def test_debias_names_an_unreadable_eval_json(runs_root, text, message):
    bad = make_run(runs_root, "debias/bad", "debias")
    bad.eval_path.write_text(text)
    assert_named(open_page("debias", run="debias/bad"), "debias/bad", bad, message)


@UNREADABLE_EVAL
def test_tcm_names_an_unreadable_eval_json_and_shows_the_other_runs(runs_root, text, message):
    bad = make_run(runs_root, "tcm/bad", "tcm")
    bad.eval_path.write_text(text)
    at = open_page("tcm", run=["tcm/bad", "tcm/t1"])
    assert_named(at, "tcm/bad", bad, message)
    assert at.dataframe[0].value.columns.tolist() == ["tcm/t1", "tcm/t1 n"]


@pytest.mark.parametrize(
    "result",
    [{"cooperation_vs_r": 0.5, "snapshots": 3}, {"cooperation_vs_r": ["x"], "snapshots": [[1, 0]]}],
)
def test_public_goods_skips_entries_that_are_not_objects(runs_root, result):
    make_run(runs_root, "public-goods/odd", "public-goods").write_eval(result)
    at = open_page("public_goods", run=["public-goods/odd", "public-goods/p1"])
    assert at.dataframe[0].value["run"].unique().tolist() == ["public-goods/p1"]
    assert at.selectbox(key="pgg_snapshot_run").options == ["public-goods/p1"]


@pytest.mark.parametrize(
    "result",
    [{"bias": 0.3, "responses": 5}, {"bias": {"age": 0.3}, "responses": {"age": "x"}}],
)
def test_debias_skips_entries_that_are_not_objects(runs_root, result):
    make_run(runs_root, "debias/odd", "debias").write_eval(result)
    at = open_page("debias", run="debias/odd")
    assert texts(at.info)[0] == "No `bias` scores in eval.json."
    assert texts(at.info)[1].startswith("No `responses` in debias/odd's eval.json")


def test_debias_skips_responses_that_are_not_objects(runs_root):
    responses = ["x", {"category": "age", "stage": "after", "prompt": "p", "response": "r", "bias": 0.2}]
    make_run(runs_root, "debias/odd", "debias").write_eval({"bias": {}, "responses": responses})
    at = open_page("debias", run="debias/odd")
    assert at.dataframe[0].value["response"].tolist() == ["r"]


@pytest.mark.parametrize(
    "result, shown",
    [
        ({"accuracy_by_type": 0.5}, ["tcm/t1", "tcm/t1 n"]),
        ({"accuracy_by_type": {"single": 0.7}, "count_by_type": 3}, ["tcm/odd", "tcm/t1", "tcm/t1 n"]),
    ],
)
def test_tcm_skips_tables_that_are_not_objects(runs_root, result, shown):
    make_run(runs_root, "tcm/odd", "tcm").write_eval(result)
    at = open_page("tcm", run=["tcm/odd", "tcm/t1"])
    assert at.dataframe[0].value.columns.tolist() == shown


def test_the_runs_table_reads_no_metrics_file_again_when_none_changed(runs_root, monkeypatch):
    """Each rerun builds the table from every run's metrics; with more runs than the cache held (64), the
    least recently read were evicted and every rerun read every file again."""
    for i in range(70):
        run = make_run(runs_root, f"many/r{i:02d}", "public-goods")
        run.log_metrics(1, {"cooperation": 0.5})
    reads = []
    read_metrics = loading.read_metrics
    monkeypatch.setattr(loading, "read_metrics", lambda path: reads.append(path) or read_metrics(path))
    at = open_page("runs")
    assert len(at.dataframe[0].value) == 80 and len(reads) >= 80
    reads.clear()
    at.run()
    assert not at.exception and reads == []


def test_a_single_run_page_opens_on_the_newest_run_or_the_first_the_url_names(runs_root):
    set_started(runs_root, "debias/d1", "2020-01-01T00:00:00+00:00")
    make_run(runs_root, "debias/e2", "debias").write_eval({"bias": {"race": {"before": 0.6, "after": 0.5}}})
    at = open_page("debias")  # debias/e2 is listed last and started last
    assert at.selectbox(key="debias_run").value == "debias/e2"
    assert at.dataframe[0].value.index.tolist() == ["race"]
    at = open_page("debias", run=["debias/d1", "debias/e2"])
    assert at.selectbox(key="debias_run").value == "debias/d1"


def test_a_url_run_of_another_app_is_not_picked_on_an_app_page(runs_root):
    at = open_page("tcm", run=["toy/a", "tcm/t1"])
    assert at.multiselect(key="tcm_runs").value == ["tcm/t1"]
    at = open_page("debias", run="toy/a")
    assert at.selectbox(key="debias_run").value == "debias/d1"


def test_a_run_that_cannot_be_read_is_not_offered_on_the_app_pages(runs_root):
    make_run(runs_root, "math/bad", "math").status_path.write_text("[]")
    assert open_page("tcm").multiselect(key="tcm_runs").options == ["tcm/t1"]


def test_public_goods_names_the_runs_without_an_eval_json(runs_root):
    make_run(runs_root, "public-goods/new", "public-goods")
    at = open_page("public_goods", run=["public-goods/new", "public-goods/p1"])
    assert "No eval.json yet: public-goods/new" in texts(at.caption)
    assert at.dataframe[0].value["run"].unique().tolist() == ["public-goods/p1"]


def test_the_runs_csv_holds_the_filtered_table_and_the_file_names_no_folder(runs_root, downloads):
    at = open_page("runs", run="toy/a")
    at.multiselect(key="runs_status").set_value(["failed"]).run()
    name, text = csv_download(downloads, "runs_csv")
    assert name == "runs.csv"
    table = pd.read_csv(io.StringIO(text))
    assert table.columns[0] == "run" and table["run"].tolist() == ["toy/c"]  # no index column
    assert csv_download(downloads, "runs_config_csv")[0] == "config-toy_a.csv"


def test_text_values_of_eval_json_are_shown_as_they_are(runs_root):
    result = {"model": "qwen-0.5b", "scores": {"accuracy": 0.5}, "seeds": [1, 2]}
    make_run(runs_root, "toy/e", "toy").write_eval(result)
    at = open_page("runs", run="toy/e")
    assert at.dataframe[2].value["value"].to_dict() == {
        "model": "qwen-0.5b",
        "scores.accuracy": "0.5",
        "seeds": "[1, 2]",
    }


def test_the_live_view_shows_every_selected_running_run(runs_root):
    run = make_run(runs_root, "toy/r2", "toy")
    run.log_metrics(1, metrics_row(1))
    run.set_status("running", step=1)
    at = open_page("runs", run=["toy/b", "toy/r2"])
    live = [caption.split(" · ")[0] for caption in texts(at.caption) if " · running · " in caption]
    assert live == ["toy/b", "toy/r2"]


def test_curves_are_drawn_over_the_logged_steps(runs_root):
    """A run logging every 10 steps, and KL logged from step 20 on."""
    run = make_run(runs_root, "toy/every10", "toy")
    run.log_metrics(10, {"reward": 0.1})
    run.log_metrics(20, {"reward": 0.2, "kl": 0.02})
    run.log_metrics(30, {"reward": 0.3, "kl": 0.03})
    at = open_page("curves", run="toy/every10")
    data = at.dataframe[0].value
    assert data[["metric", "step"]].values.tolist() == [
        ["reward", 10],
        ["reward", 20],
        ["reward", 30],
        ["kl", 20],
        ["kl", 30],
    ]
    assert data["raw"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.02, 0.03])


def test_the_prompt_picker_offers_the_prompts_of_the_steps_picked(runs_root):
    rows = [
        {"step": step, "group": 0, "prompt": f"prompt of step {step}", "completion": f"c{k}", "reward": k}
        for step in (1, 2)
        for k in range(2)
    ]
    make_run(runs_root, "toy/p", "toy").log_rollouts(rows)
    at = open_page("rollouts", run="toy/p")
    at.slider(key="ro_steps").set_value((2, 2)).run()
    assert at.selectbox(key="ro_prompt").options == ["(all)", "prompt of step 2"]


def test_the_group_view_shows_the_group_of_the_line_picked(runs_root):
    at = open_page("rollouts", run="toy/a")
    at.selectbox(key="ro_group").set_value(5).run()  # step 1, group 1
    codes = texts(at.code)
    assert codes[0] == "prompt 1"
    assert codes[1:] == [f"answer s1 g1 k{k}" for k in range(3)] + [f"answer s1 g1 k3 {SCRIPT}"]
    assert "**reward** `+1.7500` · **advantage** `+0.3750`" in texts(at.markdown)  # k3: 1 + 3/4, 3/4 - 0.375


def test_the_text_search_keeps_the_other_filters(runs_root):
    at = open_page("rollouts", run="toy/a")
    at.slider(key="ro_steps").set_value((1, 1)).run()
    at.text_input(key="ro_search").set_value("K3").run()
    assert "2 of 24 rollouts match" in texts(at.caption)
    assert at.dataframe[0].value["line"].tolist() == [3, 7]


def test_the_rollout_downloads_hold_the_page_and_every_match(runs_root, downloads):
    run = make_run(runs_root, "toy/many", "toy")
    for step in (1, 2, 3, 4):
        run.log_rollouts(toy_rollouts(step))
    at = open_page("rollouts", run="toy/many")
    at.selectbox(key="ro_page_size").set_value(25).run()
    at.number_input(key="ro_page").set_value(2).run()
    name, page = csv_download(downloads, "ro_page_csv")
    assert name == "rollouts-page-toy_many.csv"
    assert pd.read_csv(io.StringIO(page))["line"].tolist() == list(range(25, 32))
    name, matching = csv_download(downloads, "ro_all_csv")
    assert name == "rollouts-all-toy_many.csv"
    assert pd.read_csv(io.StringIO(matching))["line"].tolist() == list(range(32))


def test_the_sudoku_rank_correlation_ranks_the_orders_over_the_shared_cells(runs_root):
    """The solver's order names 3 of the 4 cells filled: their emission orders 4, 1, 2 rank as 3, 1, 2."""
    row = sudoku_row() | {
        "emitted": [[0, 1, 2], [1, 0, 3], [0, 3, 4], [3, 3, 1]],
        "solver_order": [[3, 3], [0, 1], [1, 0]],
    }
    make_run(runs_root, "sudoku/partial", "sudoku").log_rollouts([row])
    values = {m.label: m.value for m in open_page("sudoku", run="sudoku/partial").metric}
    assert (values["Filled correctly"], values["Errors"]) == ("4", "0")
    assert values["Order vs solver (Spearman)"] == "-0.50"  # not Pearson's -0.65 of the orders themselves


def test_the_sudoku_page_opens_on_the_last_step(runs_root):
    last = sudoku_row() | {"step": 2, "emitted": [[0, 1, 2], [0, 3, 4], [1, 0, 3], [3, 3, 1]]}
    make_run(runs_root, "sudoku/two", "sudoku").log_rollouts([sudoku_row(), last])
    at = open_page("sudoku", run="sudoku/two")
    assert at.select_slider(key="sudoku_step").value == 2
    values = {m.label: m.value for m in at.metric}
    assert (values["Filled correctly"], values["Errors"]) == ("4", "0")


def test_debias_responses_by_category_and_how_many(runs_root):
    at = open_page("debias")
    at.selectbox(key="debias_category").set_value("age").run()
    assert at.dataframe[1].value["response"].tolist() == ["meh", SCRIPT]
    at.number_input(key="debias_k").set_value(1).run()
    assert at.dataframe[1].value["response"].tolist() == ["meh"]
    assert at.dataframe[2].value["response"].tolist() == [SCRIPT]


def test_responses_without_a_bias_value_are_not_ranked(runs_root):
    responses = [
        {"category": "age", "stage": "after", "prompt": "p", "response": response, "bias": bias}
        for response, bias in (("a", 0.2), ("b", None), ("c", 0.7), ("d", True), ("e", "0.9"))
    ]  # not numbers: null (a NaN), a bool, text
    make_run(runs_root, "debias/n", "debias").write_eval({"bias": {}, "responses": responses})
    at = open_page("debias", run="debias/n")
    assert at.dataframe[0].value["response"].tolist() == ["a", "c"]
    assert at.dataframe[1].value["response"].tolist() == ["c", "a"]


def test_the_pass_at_k_chart_averages_the_runs_of_each_algorithm(runs_root):
    data = chart_data(open_page("math_page"), 0).sort_values(["algorithm", "k"])
    assert data[["algorithm", "benchmark", "k"]].values.tolist() == [
        ["grpo", "gsm8k", 1],
        ["grpo", "gsm8k", 8],
        ["gtpo", "gsm8k", 1],
        ["gtpo", "gsm8k", 8],
    ]
    assert data["pass"].tolist() == pytest.approx([0.3, 0.6, 0.3, 0.8])


def test_tcm_counts_are_matched_to_their_question_type(runs_root):
    counts = {"multi": 4, "fill": 7, "single": 10}  # not in the order of accuracy_by_type
    make_run(runs_root, "tcm/t2", "tcm").write_eval(
        {"accuracy_by_type": {"single": 0.5, "multi": 0.25}, "count_by_type": counts}
    )
    wide = open_page("tcm", run="tcm/t2").dataframe[0].value
    assert wide["tcm/t2 n"].to_dict() == {"multi": 4, "single": 10}


@pytest.mark.parametrize("arrow", [False, True])
def test_rollout_components_that_are_not_an_object_are_reported(runs_root, monkeypatch, arrow):
    """Plain json checks them as it indexes; a file Arrow indexes has them checked as the page reads them."""
    if arrow:
        monkeypatch.setattr(loading, "_ARROW_MIN_BYTES", 0)
    run = make_run(runs_root, "toy/bad", "toy")
    run.log_rollouts([*toy_rollouts(1)[:7], {**toy_rollouts(1)[7], "rewards": "bad"}])
    at = open_page("rollouts", run="toy/bad")
    assert texts(at.error) == ["Cannot read the rollouts of toy/bad:"]
    assert texts(at.code)[-1] == (
        f"{run.rollouts_path.resolve()}:8: 'rewards' must be an object of reward components, got 'bad'"
    )


@pytest.mark.parametrize("kind, problem", [("file", "is not a directory"), ("missing", "does not exist")])
def test_a_runs_folder_that_is_not_one_is_named(tmp_path, monkeypatch, kind, problem):
    root = tmp_path / "runs"
    if kind == "file":
        root.write_text("")
    monkeypatch.setenv(state.RUNS_ENV, str(root))
    at = open_page("runs")
    assert texts(at.error) == [f"The runs folder {root} {problem}: start the dashboard with --runs DIR."]


def test_curves_of_runs_whose_metrics_cannot_be_read_show_only_the_errors(runs_root):
    run = make_run(runs_root, "toy/bad", "toy")
    run.metrics_path.write_text('{"step": 1, "reward": "high"}\n')
    at = open_page("curves", run="toy/bad")
    assert texts(at.error) == ["Cannot read the metrics of toy/bad:"]
    assert texts(at.code) == [
        f"{run.metrics_path.resolve()}:1: metric 'reward' must be a finite number or null, got 'high'"
    ]
    assert not at.info
