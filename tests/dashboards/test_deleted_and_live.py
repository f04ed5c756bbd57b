"""Pages left open while runs change under them: a run deleted (the page names it with the reason), a
running run killed (shown crashed), and a running run logging new steps (the Rollouts page keeps the ranges
the user picked)."""

import json
import shutil
import subprocess
import sys

import pytest
from streamlit.testing.v1 import AppTest

from core.runs import RunDir
from dashboards import loading, state

from .conftest import make_run, metrics_row, toy_rollouts
from .test_dash_pages import TIMEOUT, open_page, texts


@pytest.fixture
def listed(runs_root, monkeypatch):
    """The run list as drawn, kept after a run is deleted (as the page's cached list is for a few seconds)."""
    names = loading.find_runs(runs_root)
    monkeypatch.setattr(state, "run_names", lambda root: names)
    return runs_root


@pytest.mark.parametrize(
    "page, chosen, message",
    [
        ("runs", ["toy/a", "toy/c"], "Cannot read toy/a:"),
        ("curves", ["toy/a", "toy/b"], "Cannot read the metrics of toy/a:"),
        ("rollouts", "toy/a", "Cannot read the rollouts of toy/a:"),
    ],
)
def test_a_run_deleted_while_its_page_is_open_is_named_with_the_reason(listed, page, chosen, message):
    at = open_page(page, run=chosen)
    shutil.rmtree(listed / "toy/a")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert message in texts(at.error)
    assert any(code.startswith("no run 'toy/a' under") for code in texts(at.code))
    if page == "runs":  # the other run is still shown: its failure
        assert "CUDA out of memory <b>x</b>" in texts(at.code)
    if page == "curves":  # the other run is still drawn
        assert at.get("vega_lite_chart")


def live_tick(name: str) -> None:
    from dashboards.views import runs

    runs._live(name)


def test_the_live_view_names_a_running_run_deleted_since_the_page_was_drawn(runs_root):
    """The live fragment refreshes the runs that were running when the page was drawn."""
    at = AppTest.from_function(live_tick, args=("toy/b",), default_timeout=TIMEOUT).run()
    assert texts(at.caption)[0].startswith("toy/b · running · step 1")
    shutil.rmtree(runs_root / "toy/b")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert texts(at.error) == ["Cannot read toy/b:"]
    assert texts(at.code)[0].startswith("no run 'toy/b' under")


def test_the_rollout_ranges_picked_are_kept_while_the_run_logs_steps(runs_root):
    run = make_run(runs_root, "toy/live", "toy")
    for step in (1, 2, 3):
        run.log_rollouts(toy_rollouts(step))
    run.set_status("running", step=3)
    at = open_page("rollouts", run="toy/live")
    at.slider(key="ro_steps").set_value((1, 1)).run()
    at.slider(key="ro_reward").set_value((0.5, 1.0)).run()
    assert "3 of 24 rollouts match" in texts(at.caption)
    rows = toy_rollouts(4)
    rows[0]["reward"] = 3.0  # the reward range grows too
    run.log_rollouts(rows)
    at.run()
    assert at.slider(key="ro_steps").value == (1, 1)
    assert at.slider(key="ro_reward").value == (0.5, 1.0)
    assert "3 of 32 rollouts match" in texts(at.caption)


def test_the_whole_rollout_ranges_follow_a_run_logging_steps(runs_root):
    run = make_run(runs_root, "toy/live", "toy")
    for step in (1, 2):
        run.log_rollouts(toy_rollouts(step))
    at = open_page("rollouts", run="toy/live")
    assert at.slider(key="ro_steps").value == (1, 2)
    assert at.slider(key="ro_reward").value == (0.0, 1.75)
    rows = toy_rollouts(3)
    rows[0]["reward"] = 3.0
    run.log_rollouts(rows)
    at.run()
    assert at.slider(key="ro_steps").value == (1, 3)
    assert at.slider(key="ro_reward").value == (0.0, 3.0)
    assert "24 of 24 rollouts match" in texts(at.caption)


def test_a_step_range_picked_on_one_run_is_clamped_to_the_next_one(runs_root):
    later = make_run(runs_root, "toy/later", "toy")
    for step in (2, 3, 4, 5):
        later.log_rollouts(toy_rollouts(step))
    at = open_page("rollouts", run="toy/a")  # steps 1 to 3
    at.slider(key="ro_steps").set_value((2, 3)).run()
    at.selectbox(key="rollouts_run").set_value("toy/later").run()
    assert at.slider(key="ro_steps").value == (2, 3)
    at.selectbox(key="rollouts_run").set_value("toy/a").run()
    at.slider(key="ro_steps").set_value((1, 1)).run()
    at.selectbox(key="rollouts_run").set_value("toy/later").run()
    assert at.slider(key="ro_steps").value == (2, 5)  # nothing of (1, 1) is left: the whole range


def test_a_run_whose_config_cannot_be_read_is_not_a_run_to_the_dashboard(runs_root):
    """As docs/dashboards.md says: not listed, and a URL naming it is reported as a run that does not exist."""
    bad = make_run(runs_root, "toy/bad", "toy")
    bad.set_status("finished", step=0)
    (bad.path / "config.json").write_text('{"app": "toy", "config": {')
    assert "toy/bad" not in open_page("runs").dataframe[0].value["run"].tolist()
    at = open_page("runs", run="toy/bad")
    assert "The URL names a run that does not exist:" in texts(at.warning) and "toy/bad" in texts(at.code)


def test_a_run_whose_process_was_killed_is_shown_crashed_not_running(runs_root):
    """toy/b's status says "running"; its process (a pid of this machine that no longer exists) is gone."""
    at = open_page("runs", run=["toy/b"])
    assert "toy/b · running · step 1" in texts(at.caption)[-1]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=60)
    status = json.loads((runs_root / "toy/b/status.json").read_text())
    (runs_root / "toy/b/status.json").write_text(json.dumps(status | {"pid": gone.pid}))
    RunDir(runs_root / "toy/b").log_metrics(2, metrics_row(2))  # logged after its last checkpoint (step 1)
    assert loading.run_info(runs_root, "toy/b").status == "crashed"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    assert table.loc[table["run"] == "toy/b", "status"].tolist() == ["crashed"]
    warning = f"toy/b stopped at step 2: process {gone.pid} ended without recording the run's end (killed?)"
    assert texts(at.warning) == [warning]
    assert not any(caption.startswith("toy/b · running") for caption in texts(at.caption))  # no live view


def test_a_running_run_logging_steps_shows_its_last_logged_step(runs_root):
    """status.json keeps step 1 (no checkpoint since); the table and the live view follow metrics.jsonl."""
    run = RunDir(runs_root / "toy/b")
    run.log_metrics(2, metrics_row(2))
    run.log_metrics(3, metrics_row(3))
    at = open_page("runs", run=["toy/b"])
    table = at.dataframe[0].value
    assert table.loc[table["run"] == "toy/b", "step"].tolist() == [3]
    assert texts(at.caption)[-1].startswith("toy/b · running · step 3 · updated ")
