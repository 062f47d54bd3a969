"""Line figures (PNG/SVG for papers): one line per series over a shared x axis, in the style of
the report's heatmaps (same DPI, literal user text, SVG text kept as text). Receives plain
values; knows nothing of models or lenses.

On a log y axis (`log_y`) a value below `y_min` (zero, or a float error just below it) cannot
be drawn: it is drawn on `y_min`, with a hollow marker, and the title says so. Series labels,
the title and the axis labels may come from users: they are drawn with mathtext and TeX off,
and the legend is given its labels explicitly (matplotlib would drop a label starting with
'_').
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np

from klstore.report.plotting import DPI

FIGSIZE = (6.4, 4.2)  # inches
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
DASHED = "#333333"  # a dashed series (the baseline): dark grey
_TITLE_CHARS = 70  # per title line


@dataclass(frozen=True)
class Series:
    """One line: y (len(x),), NaN where there is no value (a gap). `hover`: per point, extra
    lines for the interactive figure (plain text)."""

    label: str
    x: tuple[int, ...]
    y: np.ndarray
    dashed: bool = False
    hover: tuple[str, ...] = ()


@dataclass(frozen=True)
class LinesData:
    """A figure of several lines."""

    title: str
    series: tuple[Series, ...]
    xlabel: str
    ylabel: str
    log_y: bool = True
    y_min: float | None = None  # log axis: values below it are drawn on it (hollow markers)


def shown(data: LinesData, series: Series) -> tuple[np.ndarray, np.ndarray]:
    """(the y values as drawn, the points drawn on y_min instead of their value)."""
    y = np.asarray(series.y, dtype=np.float64)
    if not data.log_y or data.y_min is None:
        return y, np.zeros(y.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        low = np.isfinite(y) & (y < data.y_min)
    return np.where(low, data.y_min, y), low


def colour(i: int, series: Series) -> str:
    return DASHED if series.dashed else COLOURS[i % len(COLOURS)]


def clipped_note(data: LinesData) -> str | None:
    """The title's line on values drawn on the axis bottom, or None when there are none."""
    if not any(shown(data, s)[1].any() for s in data.series):
        return None
    return f"\u25cb below {data.y_min:g}: drawn at {data.y_min:g}"


def draw(data: LinesData, figure=None):
    """A matplotlib Figure of the lines (Agg backend). `figure`: one of FIGSIZE to redraw into."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if figure is not None:
        figure.clear()
        fig = figure
    else:
        fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
    literal = {"usetex": False, "parse_math": False}  # user text: never TeX or mathtext
    ax = fig.add_subplot()
    handles, labels = [], []
    any_low = False
    for i, series in enumerate(data.series):
        y, low = shown(data, series)
        (line,) = ax.plot(
            series.x,
            y,
            linestyle="--" if series.dashed else "-",
            marker="o",
            markersize=3.5,
            linewidth=1.6,
            color=colour(i, series),
            gid=f"series-{i}",
        )
        handles.append(line)
        labels.append(series.label)
        if low.any():
            any_low = True
            x = np.asarray(series.x)[low]
            ax.plot(
                x,
                y[low],
                linestyle="none",
                marker="o",
                markersize=5,
                markerfacecolor="white",
                color=colour(i, series),
                gid=f"below-y-min-{i}",
            )
    if data.log_y:
        ax.set_yscale("log")
        if any_low and data.y_min is not None:
            ax.set_ylim(bottom=data.y_min / 1.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="major", color="#e4e4e4", linewidth=0.6)
    ax.set_xlabel(data.xlabel, **literal)
    ax.set_ylabel(data.ylabel, **literal)
    title = textwrap.wrap(data.title, _TITLE_CHARS, break_on_hyphens=False) or [""]
    note = clipped_note(data)
    ax.set_title("\n".join(title + ([note] if note else [])), fontsize=10, **literal)
    if handles:
        legend = ax.legend(handles, labels, fontsize=8, frameon=False)
        for text in legend.get_texts():
            text.set_usetex(False)
            text.set_parse_math(False)
    return fig


def save(data: LinesData, path, *more_paths, figure=None):
    """Draw and write the figure to each path (format from the suffix: .png, .svg, .pdf)."""
    import matplotlib

    fig = draw(data, figure=figure)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "klstore"}):
        for target in (path, *more_paths):
            png = str(target).lower().endswith(".png")
            # SVG without its date: a rebuild of the same numbers gives the same bytes
            options = {"pil_kwargs": {"compress_level": 1}} if png else {"metadata": {"Date": None}}
            fig.savefig(target, dpi=DPI, **options)
    return fig
