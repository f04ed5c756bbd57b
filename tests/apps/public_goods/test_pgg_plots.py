"""public_goods plots and simulate: the over-time figure's colours against its colour bar, a run that
starts in an absorbing state, the readers' errors on a damaged results.csv, series.jsonl or snapshots.npz,
and figures written whole or not at all."""

import io
import json
import os
from contextlib import nullcontext

import matplotlib.colors as mcolors
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from apps.public_goods import plots
from apps.public_goods.experiments import RESULT_FIELDS, read_table, simulate, write_table
from apps.public_goods.model import GameConfig
from core.cli import main
from core.data import InputError
from core.runs import RunDir


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


def _sweep_dir(path):
    """A sweep's results.csv (2 rows: lines 2 and 3) and series.jsonl (2 lines)."""
    rows = [
        dict.fromkeys(RESULT_FIELDS, 0) | {"method": "fermi", "init": "half", "r": r, "seconds": 0.125}
        for r in (3.0, 5.0)
    ]
    write_table(rows, path / "results.csv")
    series = [
        {"method": "fermi", "init": "half", "r": r, "t": [0, 1], "cooperation": [0.5, 0.5]} for r in (3, 5)
    ]
    (path / "series.jsonl").write_text("".join(json.dumps(s) + "\n" for s in series))
    return path


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[: data.rindex(b",0,0,0.125")], r":3: no seconds field: the row is cut short"),
        (lambda data: data.replace(b",0,0,0,0.125", b",abc,0,0,0.125"), r":2: mean_cooperation 'abc' is not"),
        (lambda data: data.replace(b",5.0,0,", b",5.0,x,"), r":3: seed 'x' is not a valid int"),
        # a sweep's resume read it with a bare int() (ValueError without file or line)
        (
            lambda data: b",6x,0.125".join(data.rsplit(b",0,0.125", 1)),
            r":3: absorbed_at '6x' is not a valid int",
        ),
        (lambda data: data[:-3], r":3: the last row has no line end: the file was cut off"),  # seconds 0.12
        (lambda data: data.replace(b",5.0,0,", b",inf,0,"), r":3: r must be > 0 and finite, got inf"),
        (lambda data: data.replace(b",5.0,0,", b",nan,0,"), r":3: r must be > 0 and finite, got nan"),
        (
            lambda data: data.replace(b"method,init,", b"method,").replace(b"fermi,half,", b"fermi,"),
            r":1: no init column in the header",
        ),
        (
            lambda data: data.replace(b"method,", b"").replace(b"fermi,", b""),
            r":1: no method column in the header",
        ),
    ],
)
def test_a_damaged_results_table_is_an_error_naming_line_and_field(tmp_path, damage, message):
    path = _sweep_dir(tmp_path) / "results.csv"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(InputError, match=rf"{path}{message}"):
        read_table(path)


@pytest.mark.parametrize(
    ("name", "old", "new", "message"),
    [
        (
            "results.csv",
            b",0,0,0,0.125",
            b",abc,0,0,0.125",
            ":2: mean_cooperation 'abc' is not a valid float",
        ),
        ("results.csv", b",init,", b",", ":1: no init column in the header"),
        ("series.jsonl", b"[0.5, 0.5]}\n{", b"[0.5]}\n{", ":1: cooperation has 1 values for 2 times t"),
    ],
)
def test_plot_of_a_damaged_sweep_file_says_where_without_a_traceback(
    tmp_path, capsys, name, old, new, message
):
    path = _sweep_dir(tmp_path) / name
    path.write_bytes(path.read_bytes().replace(old, new))
    with pytest.raises(SystemExit) as exit_info:
        main(["public-goods", "plot", "--run-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"{path}{message}" in capsys.readouterr().err


def test_a_cut_off_last_series_line_is_left_out_with_a_warning(tmp_path):
    path = _sweep_dir(tmp_path) / "series.jsonl"
    path.write_text(path.read_text()[:-20])  # a sweep killed while writing its second trajectory
    with pytest.warns(UserWarning, match=rf"{path}:2: the last line has no line end"):
        plots.plot_sweep(read_table(tmp_path / "results.csv"), tmp_path)
    assert (tmp_path / "cooperation_over_time.png").is_file()
    path.write_text(path.read_text().split("\n")[0][:-20])  # its first: no trajectory, no over-time figure
    (tmp_path / "cooperation_over_time.png").unlink()
    with pytest.warns(UserWarning, match=rf"{path}:1: the last line has no line end"):
        assert plots.plot_sweep(read_table(tmp_path / "results.csv"), tmp_path) == [
            tmp_path / "cooperation_vs_r.png"
        ]


_LINE = {"method": "fermi", "init": "half", "r": 4, "t": [0, 1], "cooperation": [0.5, 0.5]}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"method": "fermi"}', "not a trajectory"),
        (json.dumps(_LINE | {"cooperation": [0.5]}), "cooperation has 1 values for 2 times t"),
        (
            json.dumps(_LINE | {"cooperation": [0.5, "x"]}),
            r"cooperation \[0.5, 'x'\] is not a list of numbers",
        ),
        (json.dumps(_LINE | {"t": None}), "t None is not a list of numbers"),
        (json.dumps(_LINE | {"t": [0, True]}), r"t \[0, True\] is not a list of numbers"),
        (json.dumps(_LINE | {"r": "4"}), "r '4' is not a number"),
        (json.dumps(_LINE | {"method": 1}), "method 1 is not a string"),
        (json.dumps(_LINE | {"t": [0, 2]}), "t is not that of line 1 \\(a sweep has one time grid\\)"),
    ],
)
def test_a_malformed_series_line_is_an_error_naming_it(tmp_path, line, message):
    path = _sweep_dir(tmp_path) / "series.jsonl"
    first, second = path.read_text().splitlines()
    path.write_text(f"{first}\n{line}\n{second}\n")
    with pytest.raises(InputError, match=rf"{path}:2: {message}"):
        plots.plot_sweep(read_table(tmp_path / "results.csv"), tmp_path)


def test_a_cut_short_snapshots_archive_is_an_error_naming_it(tmp_path):
    path = tmp_path / "snapshots.npz"
    np.savez_compressed(path, t0=np.zeros((3, 3), np.int8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match=rf"{path}: not a readable snapshots archive"):
        plots.plot_run([{"step": 1, "cooperation": 0.0}], path, tmp_path)


def test_a_snapshots_archive_without_the_initial_lattice_is_an_error_naming_it(tmp_path):
    path = tmp_path / "snapshots.npz"
    np.savez_compressed(path, t1=np.zeros((3, 3), np.int8))
    with pytest.raises(InputError, match=rf"{path}: no t0 \(the initial lattice\) in the snapshots archive"):
        plots.plot_run([{"step": 1, "cooperation": 0.0}], path, tmp_path)


def test_a_run_stopped_before_its_end_plots_its_curve_from_round_1_with_a_warning(tmp_path, monkeypatch):
    """Its snapshots.npz is written at the end: `plot` failed with a bare FileNotFoundError."""
    drawn = []

    def save(fig, path):
        drawn.append((path.name, [line.get_xydata().tolist() for ax in fig.axes for line in ax.lines]))
        return path

    monkeypatch.setattr(plots, "_save", save)
    metrics = [{"step": 1, "cooperation": 0.5}, {"step": 2, "cooperation": 0.25}]
    with pytest.warns(
        UserWarning,
        match=r"snapshots.npz is not there \(a run writes it at its end, which this one has not reached\)",
    ):
        plots.plot_run(metrics, tmp_path / "snapshots.npz", tmp_path)
    assert drawn == [("cooperation.png", [[[1.0, 0.5], [2.0, 0.25]]])]  # no round 0, no snapshots.png
    drawn.clear()
    np.savez_compressed(tmp_path / "snapshots.npz", t0=np.array([[1, 0], [0, 0]], np.int8))
    plots.plot_run(metrics, tmp_path / "snapshots.npz", tmp_path)
    assert drawn[0] == ("cooperation.png", [[[0.0, 0.25], [1.0, 0.5], [2.0, 0.25]]])


@pytest.mark.parametrize(("row", "shown"), [({}, "None"), ({"cooperation": "0.5"}, "'0.5'")])
def test_a_metrics_line_without_a_cooperation_number_is_named(tmp_path, capsys, row, shown):
    """It had been a bare KeyError."""
    run = RunDir.create(
        tmp_path / "run", {}, app="public_goods", algorithm="fermi", exist_ok_for_resume=False
    )
    run.log_metrics(1, {"cooperation": 0.5})
    with open(run.metrics_path, "a") as f:  # written by hand: log_metrics refuses a text value
        f.write(json.dumps({"step": 2, **row}) + "\n")
    np.savez_compressed(run.path / "snapshots.npz", t0=np.zeros((3, 3), np.int8))
    with pytest.raises(SystemExit) as exit_info:
        main(["public-goods", "plot", "--run-dir", str(run.path)])
    assert exit_info.value.code == 2
    assert (
        f"{run.path / 'metrics.jsonl'}:2: 'cooperation' is not a number: {shown}" in capsys.readouterr().err
    )


def test_a_figure_that_fails_midway_leaves_the_previous_one(tmp_path, monkeypatch):
    real_print_png = FigureCanvasAgg.print_png

    def print_png(self, target, **kwargs):  # writes half of the image, then fails (a full disk)
        png = io.BytesIO()
        real_print_png(self, png)
        with open(target, "wb") if isinstance(target, str | os.PathLike) else nullcontext(target) as file:
            file.write(png.getvalue()[: len(png.getvalue()) // 2])
        raise OSError("No space left on device")

    _sweep_dir(tmp_path)
    (tmp_path / "cooperation_vs_r.png").write_bytes(b"old")
    monkeypatch.setattr(FigureCanvasAgg, "print_png", print_png)
    with pytest.raises(OSError, match="No space left"):
        plots.plot_sweep(read_table(tmp_path / "results.csv"), tmp_path)
    assert (tmp_path / "cooperation_vs_r.png").read_bytes() == b"old"
