"""The dashboards' plots: one small description, drawn by Altair (Vega-Lite) on the page and by matplotlib
for the PNG download (Streamlit turns off Vega's own export menu, and vl-convert is not a dependency).

Three kinds cover every page: `line` (curves, faceted per metric, coloured per run), `bar` (grouped bars)
and `grid` (a board or lattice: one cell per (row, col) with a colour and an optional label).
"""

import io
from dataclasses import dataclass, field
from typing import Literal

import altair as alt
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

MAX_GRID_INCHES = 12


@dataclass(frozen=True)
class Plot:
    """`data` is tidy: one row per point (line), bar (bar) or cell (grid).

    line: x, y numeric; color nominal (one line each); facet nominal (one panel each, own y scale).
    bar: x nominal, y numeric; color nominal (bars side by side).
    grid: x = column, y = row (ints from 0, row 0 on top); color numeric (a ramp, `scheme`: the lowest value
    gets its first colour, the highest its last) or nominal (`palette` maps each value to a colour); text:
    the label in each cell.
    """

    kind: Literal["line", "bar", "grid"]
    data: pd.DataFrame
    x: str
    y: str
    color: str | None = None
    facet: str | None = None
    text: str | None = None
    title: str = ""
    scheme: str = "viridis"
    palette: dict[str, str] = field(default_factory=dict)

    # -- Altair --------------------------------------------------------------------------------------------

    def chart(self) -> alt.Chart:
        if self.kind == "line":
            return self._line_chart()
        if self.kind == "bar":
            return self._bar_chart()
        return self._grid_chart()

    def _line_chart(self) -> alt.Chart:
        color = alt.Color(f"{self.color}:N", title=self.color) if self.color else alt.Undefined
        tooltip = [c for c in (self.facet, self.color, self.x, self.y) if c]
        base = (
            alt.Chart(self.data)
            .mark_line(point=len(self.data) < 200)
            .encode(
                x=alt.X(f"{self.x}:Q", title=self.x),
                y=alt.Y(f"{self.y}:Q", title=None if self.facet else self.y, scale=alt.Scale(zero=False)),
                color=color,
                tooltip=tooltip,
            )
        )
        if self.facet:
            base = base.properties(width=320, height=180).facet(
                facet=alt.Facet(f"{self.facet}:N", title=None), columns=2
            )
            return base.resolve_scale(y="independent").properties(title=self.title)
        return base.properties(title=self.title)

    def _bar_chart(self) -> alt.Chart:
        encoding = {
            "x": alt.X(f"{self.x}:N", title=self.x),
            "y": alt.Y(f"{self.y}:Q", title=self.y),
            "tooltip": [c for c in (self.x, self.color, self.y) if c],
        }
        if self.color:
            encoding["color"] = alt.Color(f"{self.color}:N", title=self.color)
            encoding["xOffset"] = alt.XOffset(f"{self.color}:N")
        return alt.Chart(self.data).mark_bar().encode(**encoding).properties(title=self.title)

    def _grid_chart(self) -> alt.Chart:
        assert self.color is not None, "a grid plot needs a color field"
        rows = int(self.data[self.y].max()) + 1 if len(self.data) else 1
        cols = int(self.data[self.x].max()) + 1 if len(self.data) else 1
        size = max(8, min(36, 360 // max(rows, cols)))
        legend = alt.Legend(orient="bottom")
        if self.palette:
            scale = alt.Scale(domain=list(self.palette), range=list(self.palette.values()))
            color = alt.Color(f"{self.color}:N", scale=scale, legend=legend)
        else:
            color = alt.Color(f"{self.color}:Q", scale=alt.Scale(scheme=self.scheme), legend=legend)
        # A fixed step per cell (not a total width): square cells however wide the page is.
        base = (
            alt.Chart(self.data)
            .encode(x=alt.X(f"{self.x}:O", axis=None), y=alt.Y(f"{self.y}:O", axis=None))
            .properties(width=alt.Step(size), height=alt.Step(size), title=self.title)
        )
        tooltip = [c for c in (self.y, self.x, self.color, self.text) if c]
        cells = base.mark_rect(stroke="#444", strokeWidth=0.5).encode(color=color, tooltip=tooltip)
        if not self.text:
            return cells
        labels = base.mark_text(fontSize=max(7, size // 2)).encode(text=f"{self.text}:N")
        return cells + labels

    # -- PNG -----------------------------------------------------------------------------------------------

    def png(self) -> bytes:
        """The same plot drawn with matplotlib, as PNG bytes."""
        if self.kind == "line":
            fig = self._line_figure()
        elif self.kind == "bar":
            fig = self._bar_figure()
        else:
            fig = self._grid_figure()
        if self.title:
            fig.suptitle(self.title)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        return buffer.getvalue()

    def _groups(self, frame: pd.DataFrame, key: str | None) -> list[tuple[str, pd.DataFrame]]:
        if key is None:
            return [("", frame)]
        return [(str(name), part) for name, part in frame.groupby(key, sort=True, observed=True)]

    def _line_figure(self) -> Figure:
        panels = self._groups(self.data, self.facet)
        ncols = 2 if len(panels) > 1 else 1
        nrows = (len(panels) + ncols - 1) // ncols
        fig = Figure(figsize=(5 * ncols, 3 * nrows), layout="constrained")
        for i, (name, panel) in enumerate(panels):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            for label, line in self._groups(panel, self.color):
                ax.plot(line[self.x], line[self.y], label=label or None)
            ax.set_title(name)
            ax.set_xlabel(self.x)
            if self.color and i == 0:
                ax.legend(fontsize="small")
        return fig

    def _bar_figure(self) -> Figure:
        fig = Figure(figsize=(max(4, len(self.data) * 0.5), 3.5), layout="constrained")
        ax = fig.add_subplot()
        categories = list(dict.fromkeys(self.data[self.x].astype(str)))
        series = self._groups(self.data, self.color)
        width = 0.8 / len(series)
        for k, (label, part) in enumerate(series):
            values = dict(zip(part[self.x].astype(str), part[self.y], strict=True))
            xs = np.arange(len(categories)) + (k - (len(series) - 1) / 2) * width
            ax.bar(xs, [values.get(c, np.nan) for c in categories], width, label=label or None)
        ax.set_xticks(np.arange(len(categories)), categories, rotation=30, ha="right")
        ax.set_ylabel(self.y)
        if self.color:
            ax.legend(fontsize="small")
        return fig

    def _grid_figure(self) -> Figure:
        rows = int(self.data[self.y].max()) + 1
        cols = int(self.data[self.x].max()) + 1
        image = np.ones((rows, cols, 4))
        values = self.data[self.color]
        if self.palette:
            colours = np.array([to_rgba(self.palette.get(str(v), "#ffffff")) for v in values])
        else:
            numeric = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
            finite = numeric[np.isfinite(numeric)]
            low, high = (finite.min(), finite.max()) if len(finite) else (0.0, 0.0)
            ramp = (numeric - low) / (high - low) if high > low else 0.0
            scaled = np.where(np.isfinite(numeric), ramp, np.nan)
            colours = colormaps[self.scheme](np.nan_to_num(scaled))
            colours[~np.isfinite(scaled)] = 1.0  # empty cells white
        image[self.data[self.y].to_numpy(dtype=int), self.data[self.x].to_numpy(dtype=int)] = colours
        # 0.4 inch per cell, smaller for big lattices: the PNG stays near MAX_GRID_INCHES * 100 px a side
        cell = min(0.4, MAX_GRID_INCHES / max(rows, cols))
        fig = Figure(figsize=(max(2, cols * cell), max(2, rows * cell)), layout="constrained")
        ax = fig.add_subplot()
        ax.imshow(image, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if self.text:
            for r, c, label in zip(self.data[self.y], self.data[self.x], self.data[self.text], strict=True):
                if pd.notna(label) and str(label):
                    ax.text(int(c), int(r), str(label), ha="center", va="center", fontsize=20 * cell)
        return fig
