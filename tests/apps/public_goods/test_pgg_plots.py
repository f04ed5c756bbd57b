"""public_goods plots and simulate: the over-time figure's colours against its colour bar, and a run that
starts in an absorbing state."""

import json

import matplotlib.colors as mcolors
import numpy as np

from apps.public_goods import plots
from apps.public_goods.experiments import simulate
from apps.public_goods.model import GameConfig


def test_line_colours_read_their_own_r_on_the_colour_bar(tmp_path, monkeypatch):
    rs = [3.0, 3.1, 6.0]  # uneven: r's rank (1 of 2 = middle of the map) is not r (near the low end)
    series = [{"method": "fermi", "init": "half", "r": r, "t": [0, 1], "cooperation": [0.5, 0.5]} for r in rs]
    (tmp_path / "series.jsonl").write_text("".join(json.dumps(s) + "\n" for s in series))
    rows = [{"method": "fermi", "init": "half", "r": r, "seed": 0, "mean_cooperation": 0.5} for r in rs]
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    plots.plot_sweep(rows, tmp_path)
    over_time = figures[-1]
    colour_bar = next(ax for ax in over_time.axes if ax.get_label() == "<colorbar>")
    mappable = colour_bar._colorbar.mappable
    (panel,) = [ax for ax in over_time.axes if ax.lines]
    for r, line in zip(rs, panel.lines, strict=True):
        assert np.allclose(mcolors.to_rgba(line.get_color()), mappable.to_rgba(r)), r


def test_a_run_that_starts_absorbed_is_absorbed_at_step_0():
    trajectory = simulate(GameConfig(size=5, r=4.0, init="all_d"), seed=0, steps=4)
    assert trajectory.absorbed_at == 0 and trajectory.cooperation == [0.0] * 5
    later = simulate(GameConfig(size=5, r=2.0, init="half"), seed=0, steps=20)  # D takes all at step 3
    assert later.absorbed_at == 3 and later.cooperation[3:] == [0.0] * 18 and later.cooperation[2] > 0
