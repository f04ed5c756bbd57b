"""`public-goods run` and `sweep` write the eval.json fields the dashboard's Public goods page reads
(docs/dashboards.md): cooperation vs r and lattice snapshots, checked against the run's own files and shown
by the page."""

import csv
import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from apps.public_goods.experiments import make_model
from apps.public_goods.model import GameConfig
from core.cli import main


def page_app():
    from dashboards.views import public_goods

    public_goods.render()


def test_run_and_sweep_fill_the_public_goods_page(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    run_dir, sweep_dir = runs / "pgg" / "run", runs / "pgg" / "sweep"
    args = ["public-goods", "run", "--preset", "smoke", "--r", "4.5", "--steps", "12", "--p-init", "0.6"]
    assert main([*args, "--run-dir", str(run_dir)]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["cooperation_vs_r"] == [
        {"r": 4.5, "cooperation": result["mean_cooperation_last_half"], "label": "fermi"}
    ]
    snapshots = result["snapshots"]
    assert [s["step"] for s in snapshots] == [0, 1, 10] and {s["r"] for s in snapshots} == {4.5}
    initial = make_model(GameConfig(size=10, r=4.5, p_init=0.6), seed=0).strategy
    assert snapshots[0]["grid"] == initial.tolist()  # the same seed draws the same starting lattice
    metrics = {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    for snapshot in snapshots[1:]:
        grid = np.asarray(snapshot["grid"])
        assert grid.shape == (10, 10) and set(np.unique(grid)) <= {0, 1}
        assert grid.mean() == pytest.approx(metrics[snapshot["step"]]["cooperation"])

    args = ["public-goods", "sweep", "--preset", "smoke", "--methods", "fermi", "--workers", "1"]
    assert main([*args, "--run-dir", str(sweep_dir)]) == 0
    with open(sweep_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    curve = json.loads((sweep_dir / "eval.json").read_text())["cooperation_vs_r"]
    assert [(p["r"], p["label"]) for p in curve] == [(3.0, "fermi"), (5.0, "fermi")]
    for point in curve:
        seeds = [float(r["mean_cooperation"]) for r in rows if float(r["r"]) == point["r"]]
        assert len(seeds) == 2 and point["cooperation"] == pytest.approx(sum(seeds) / 2)

    monkeypatch.setenv("GRPO_SUITE_RUNS", str(runs))
    at = AppTest.from_function(page_app, default_timeout=60)
    at.query_params["run"] = ["pgg/run", "pgg/sweep"]
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    # a single run's point joins the curve of its method; a sweep's points keep the sweep's name
    assert table["label"].tolist() == ["fermi", "pgg/sweep · fermi", "pgg/sweep · fermi"]
    expected = [result["mean_cooperation_last_half"], *(p["cooperation"] for p in curve)]
    assert table["r"].tolist() == [4.5, 3.0, 5.0] and table["cooperation"].tolist() == pytest.approx(expected)
    assert at.selectbox(key="pgg_snapshot_run").value == "pgg/run"
    assert at.metric[0].value == f"{np.mean(snapshots[-1]['grid']):.1%}"  # the last snapshot, t = 10
