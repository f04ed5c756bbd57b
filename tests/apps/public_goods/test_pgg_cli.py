"""`grpo-suite public-goods run | sweep | plot` smoke runs and configuration errors."""

import csv
import json
import re

import pytest

from apps.public_goods.experiments import thresholds
from core.cli import main
from core.runs import RunDir


@pytest.mark.parametrize("method", ["fermi", "grpo-gcc"])  # every method: test_pgg_learners.py
def test_run_smoke(tmp_path, capsys, method):
    run_dir = tmp_path / method
    assert (
        main(["public-goods", "run", "--preset", "smoke", "--method", method, "--run-dir", str(run_dir)]) == 0
    )
    assert f"run directory: {run_dir}" in capsys.readouterr().out
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) <= 5 and json.loads(lines[0])["step"] == 1
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    result = json.loads((run_dir / "eval.json").read_text())
    assert 0.0 <= result["final_cooperation"] <= 1.0 and "time_to_cooperation" in result
    assert (
        result["final_cooperation"] == json.loads(lines[-1])["cooperation"]
    )  # the last step's, not the first
    if method == "grpo-gcc":
        assert main(["public-goods", "plot", "--run-dir", str(run_dir)]) == 0
        assert (run_dir / "cooperation.png").is_file() and (run_dir / "snapshots.png").is_file()


def test_sweep_and_plot_smoke(tmp_path):
    run_dir = tmp_path / "sweep"
    args = ["public-goods", "sweep", "--preset", "smoke", "--methods", "fermi,grpo", "--workers", "1"]
    assert main([*args, "--run-dir", str(run_dir)]) == 0
    with open(run_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 and {r["method"] for r in rows} == {"fermi", "grpo"}
    assert all(r["time_to_cooperation"] == "" or 0 <= int(r["time_to_cooperation"]) <= 5 for r in rows)
    summary = (run_dir / "summary.md").read_text().splitlines()
    assert summary[0].startswith("| method | init | r |") and len(summary) == 2 + 2 * 2  # method x r
    assert len(json.loads((run_dir / "eval.json").read_text())["summary"]) == 4
    assert len((run_dir / "series.jsonl").read_text().splitlines()) == 8
    assert main(["public-goods", "plot", "--run-dir", str(run_dir)]) == 0
    assert (run_dir / "cooperation_vs_r.png").is_file() and (run_dir / "cooperation_over_time.png").is_file()


def test_thresholds_bracket():
    rows = [
        {"method": "fermi", "init": "bernoulli", "r": r, "final_cooperation": c}
        for r, c in [(3.6, 0.0), (3.7, 0.0), (3.7, 0.01), (3.8, 0.3), (5.4, 0.99), (5.5, 1.0), (5.6, 1.0)]
    ]
    assert thresholds(rows) == {"r_C": [3.6, 3.8], "r_D": [5.4, 5.5]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--size", "2"], "size \\(L\\) must be an integer >= 3"),
        (["run", "--r", "0"], "r must be > 0"),
        (["run", "--method", "sarsa"], "'sarsa' is not one of"),
        (["sweep", "--methods", "fermi,sarsa"], "unknown method 'sarsa'"),
        (["sweep", "--r-values", "4,-1"], "r must be > 0"),
        (["plot"], "plot needs --run-dir"),
        (["run", "--seed", "-1"], "seed must be >= 0"),
        (["sweep", "--seeds", "0,-2"], "seeds must be >= 0"),
        (["sweep", "--seeds", "0,0"], "seeds: 0, 0 repeats a value"),
        (["sweep", "--r-values", "3,3"], "r_values: 3.0, 3.0 repeats a value"),
        (["sweep", "--init", "half"], "init=half: a sweep takes its initial states from --inits"),
        (["sweep", "--steps", "500"], "got steps 500, average_last 1000"),
        (["run", "--method", "ppo", "--clip-eps", "1.5"], "clip_eps must be in \\(0, 1\\)"),
    ],
)
def test_bad_configuration_is_a_clear_error(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["public-goods", *args])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_plot_of_a_run_with_nothing_logged_says_so(tmp_path, capsys):
    RunDir.create(tmp_path / "empty", {}, app="public-goods", algorithm="fermi", exist_ok_for_resume=False)
    with pytest.raises(SystemExit):
        main(["public-goods", "plot", "--run-dir", str(tmp_path / "empty")])
    assert "has neither results.csv (a sweep) nor metrics.jsonl (a run) to plot" in capsys.readouterr().err
