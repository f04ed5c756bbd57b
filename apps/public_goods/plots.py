"""Figures of a run or a sweep directory, written next to its data (matplotlib, headless).

    grpo-suite public-goods plot --run-dir runs/public_goods/<ts>
Run: cooperation.png (cooperation over time, symlog axis) and snapshots.png (the lattice at t = 1, 10, 100,
1000 where reached). Sweep: cooperation_vs_r.png (mean cooperation over the last steps against r, one line
per method and initial state, seeds averaged, min-max band) and cooperation_over_time.png.
"""

import io
import warnings
import zipfile
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from core.atomic import write_atomic  # noqa: E402
from core.data import InputError, read_jsonl  # noqa: E402

SNAPSHOT_PANELS = (1, 10, 100, 1000)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_numbers(value) -> bool:
    return isinstance(value, list) and all(map(_is_number, value))


SERIES_FIELDS = {  # field -> (check, what its value must be)
    "method": (lambda value: isinstance(value, str), "a string"),
    "init": (lambda value: isinstance(value, str), "a string"),
    "r": (_is_number, "a number"),
    "t": (_is_numbers, "a list of numbers"),
    "cooperation": (_is_numbers, "a list of numbers"),
}


def _time_axis(ax) -> None:
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("t (MCS or rounds)")
    ax.set_ylabel("cooperation")
    ax.set_ylim(-0.02, 1.02)


def _save(fig, path: Path) -> Path:
    """The figure as a PNG, whole or not at all (a kill mid-write leaves the previous file), then closed."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, png.getvalue())
    return path


def read_series(path: Path) -> list[dict]:
    """The trajectories of series.jsonl. A last line without its line end was cut off by a killed sweep: it
    is left out with a warning. Any other line that is not a trajectory (the fields of SERIES_FIELDS, t and
    cooperation of one length, t that of the first line: a sweep has one time grid) is an InputError naming
    the line and the field."""
    series, first = [], None
    for number, row in read_jsonl(path, cut_off_end=True):
        if any(key not in row for key in SERIES_FIELDS):
            raise InputError(f"{path}:{number}: not a trajectory (an object with {', '.join(SERIES_FIELDS)})")
        for key, (check, kind) in SERIES_FIELDS.items():
            if not check(row[key]):
                raise InputError(f"{path}:{number}: {key} {row[key]!r:.60} is not {kind}")
        if len(row["cooperation"]) != len(row["t"]):
            raise InputError(
                f"{path}:{number}: cooperation has {len(row['cooperation'])} values for {len(row['t'])} times t"
            )
        first = first or (number, row["t"])
        if row["t"] != first[1]:
            raise InputError(f"{path}:{number}: t is not that of line {first[0]} (a sweep has one time grid)")
        series.append(row)
    return series


def _snapshots(path: Path) -> dict[int, np.ndarray]:
    """{round: lattice} of a run's snapshots.npz; {} with a warning for a run stopped, or still going, before
    its end, which writes the file."""
    if not path.is_file():
        warnings.warn(
            f"{path} is not there (a run writes it at its end, which this one has not reached): the curve "
            "starts at round 1, and there is no snapshots.png",
            stacklevel=3,
        )
        return {}
    try:
        with np.load(path) as data:
            snaps = {int(k[1:]): data[k] for k in data.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as err:
        raise InputError(f"{path}: not a readable snapshots archive ({type(err).__name__}: {err})") from err
    if 0 not in snaps:
        raise InputError(f"{path}: no t0 (the initial lattice) in the snapshots archive")
    return snaps


def plot_run(metrics: list[dict], snapshots_path: Path, out: Path) -> list[Path]:
    if not metrics:
        raise ValueError(f"{out}: metrics.jsonl is empty; nothing to plot")
    for number, row in enumerate(metrics, 1):  # every line of metrics.jsonl is a row
        value = row.get("cooperation")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"{out / 'metrics.jsonl'}:{number}: 'cooperation' is not a number: {value!r}")
    snaps = _snapshots(snapshots_path)
    start = [(0, float(snaps[0].mean()))] if snaps else []  # round 0, the initial lattice
    t = [step for step, _ in start] + [m["step"] for m in metrics]
    coop = [value for _, value in start] + [m["cooperation"] for m in metrics]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(t, coop)
    _time_axis(ax)
    fig.tight_layout()
    paths = [_save(fig, out / "cooperation.png")]
    shown = [s for s in SNAPSHOT_PANELS if s in snaps]
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(2.4 * len(shown), 2.6), squeeze=False)
        for ax, step in zip(axes[0], shown, strict=True):
            ax.imshow(snaps[step], cmap="bwr_r", vmin=0, vmax=1, interpolation="nearest")  # blue C, red D
            ax.set_title(f"t = {step}")
            ax.set_axis_off()
        fig.tight_layout()
        paths.append(_save(fig, out / "snapshots.png"))
    return paths


def plot_sweep(rows: list[dict], out: Path) -> list[Path]:
    curves: dict[tuple[str, str], dict[float, list[float]]] = {}
    for row in rows:
        curves.setdefault((row["method"], row["init"]), {}).setdefault(row["r"], []).append(
            row["mean_cooperation"]
        )
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for (method, init), by_r in sorted(curves.items()):
        rs = sorted(by_r)
        ax.plot(rs, [np.mean(by_r[r]) for r in rs], "o-", ms=3, label=f"{method} ({init})")
        ax.fill_between(rs, [min(by_r[r]) for r in rs], [max(by_r[r]) for r in rs], alpha=0.2)
    ax.set_xlabel("r")
    ax.set_ylabel("cooperation (last steps)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [_save(fig, out / "cooperation_vs_r.png")]

    series_path = out / "series.jsonl"
    series = read_series(series_path) if series_path.is_file() else []
    if series:
        keys = sorted({(s["method"], s["init"], s["r"]) for s in series})
        cmap = plt.get_cmap("viridis")
        rs = sorted({k[2] for k in keys})
        norm = plt.Normalize(min(rs), max(rs))  # one map for the lines and the colour bar: r, not its rank
        methods = sorted({k[0] for k in keys})
        inits = sorted({k[1] for k in keys})
        styles = {init: ("-", "--", ":", "-.")[n % 4] for n, init in enumerate(inits)}
        # one panel per method (colour = r, line style = initial state): 8+ curves in one panel are unreadable
        fig, axes = plt.subplots(
            1,
            len(methods),
            figsize=(2.8 * len(methods) + 1, 3.0),
            sharey=True,
            squeeze=False,
            layout="constrained",
        )
        for ax, method in zip(axes[0], methods, strict=True):
            for _, init, r in (k for k in keys if k[0] == method):
                runs = [s for s in series if (s["method"], s["init"], s["r"]) == (method, init, r)]
                mean = np.mean([s["cooperation"] for s in runs], axis=0)
                color = cmap(norm(r))
                ax.plot(runs[0]["t"], mean, styles[init], color=color, lw=1)
            _time_axis(ax)
            ax.set_title(method, fontsize=9)
        for ax in axes[0][1:]:
            ax.set_ylabel("")
        axes[0][0].legend(
            [plt.Line2D([], [], color="gray", ls=st) for st in styles.values()], list(styles), fontsize=7
        )
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=norm)
        fig.colorbar(sm, ax=axes[0].tolist(), label="r")
        paths.append(_save(fig, out / "cooperation_over_time.png"))
    return paths
