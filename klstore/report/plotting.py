"""Heatmaps in the style of the seed figure (PNG/SVG for papers). Receives plain arrays;
knows nothing of models.

y axis "Layer" (the listed layers top to bottom), x axis "Generated Token"
(Gen0..GenN-1, or token texts shown by klstore.output.visible_token), YlOrRd (light yellow
= low, dark red = high), colour bar "<divergence> (nats)", values annotated in the cells
when the grid is small. The colour range follows a klstore.report.scale.Scale when given:
cells beyond it are hatched and the colour bar gets an arrow on that end. Cells below the
runs' noise floor (klstore.report.floor; |value|, or |difference|, under it) get a small dot
in their bottom-left corner, clear of the value, and the title a line saying what the dot
means. Where the listed layers jump (0, 15-21, 27: after 0 and after 21) a thin dark line
runs between the two rows (`layer_gaps`). Text that may come from users (titles, token
texts, labels) is drawn with mathtext off, so `$x$` shows as typed instead of being parsed
as TeX. SVG text stays text (`svg.fonttype: none`): smaller,
faster to write, and editable in a paper.

The layout is computed from the label lengths instead of matplotlib's tight_layout (which
renders every text once more); `draw(..., figure=fig)` redraws into an existing Figure of the
same size, so a drawing process keeps one canvas per size (klstore.report.drawing).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np

from klstore.report.grid import column_labels as column_labels  # the x labels, for klstore.api's heatmaps
from klstore.report.intervals import percent
from klstore.report.scale import Scale
from klstore.spec import REPORT_VALUES

DIVERGENCE_LABELS = {name: f"{label} (nats)" for name, label in REPORT_VALUES.items()}
DPI = 110
_CHAR = 0.075  # inches per character of a 10 pt tick label (a generous average)
_TITLE_CHAR = 0.095  # inches per character of the 12 pt title


@dataclass(frozen=True)
class HeatmapData:
    """A layers x tokens grid to draw. values: (len(layers), len(columns)); NaN = no value."""

    values: np.ndarray
    layers: tuple
    columns: tuple[str, ...]
    title: str
    divergence: str = "kl"
    counts: np.ndarray | None = None  # prompts behind each cell, shown where below the maximum
    cmap: str = "YlOrRd"  # differences use a diverging map centred on 0 ("RdBu_r")
    colorbar_label: str | None = None  # default: from the divergence
    ylabel: str = "Layer"
    scale: Scale | None = None  # None: min..max (symmetric for diverging maps)
    noise_floor: float | None = None  # nats; None: not measured (nothing marked)
    below_floor: np.ndarray | None = None  # cells whose |value| lies below noise_floor (dotted)
    # difference maps with bootstrap intervals: the cells whose interval includes 0 or that have
    # none (dotted too: not differences), and the intervals' level
    unsure: np.ndarray | None = None
    level: float | None = None
    gaps: tuple | None = None  # rows r with a break line below them; None: layer_gaps(layers)

    def breaks(self) -> tuple[int, ...]:
        return layer_gaps(self.layers) if self.gaps is None else tuple(self.gaps)


GAP_COLOUR = "#222222"  # the break line between rows whose layers are not consecutive


def layer_gaps(layers) -> tuple[int, ...]:
    """The rows r after which the layer sequence jumps (layers[r + 1] > layers[r] + 1): a
    break line is drawn between rows r and r + 1. Only whole-number layers have gaps (a
    relative-depth comparison's rows are fractions; klstore.report.aggregate sets its gaps)."""
    whole = [isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in layers]
    return tuple(
        r for r in range(len(layers) - 1) if whole[r] and whole[r + 1] and int(layers[r + 1]) > int(layers[r]) + 1
    )


def cell_text(value: float) -> str:
    """A cell's value as shown in it: two decimals, 'n/a' where there is none, and no '-0.00'
    for a float error just below zero (the last layer's logit lens)."""
    if not np.isfinite(value):
        return "n/a"
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def figure_size(n_rows: int, n_cols: int) -> tuple[float, float]:
    return max(4.5, 1.1 * n_cols + 2.5), max(3.0, 0.42 * n_rows + 1.6)


def _range(data: HeatmapData, values, vmin, vmax):
    """(lo, hi, log, above mask, below mask) of the colour range."""
    scale = data.scale
    if scale is not None and vmin is None and vmax is None:
        return scale.lo, scale.hi, scale.log, scale.above, scale.below
    finite = values[np.isfinite(values)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if data.cmap != "YlOrRd" and vmin is None and vmax is None:  # diverging: symmetric about 0
        hi = max(abs(lo), abs(hi))
        lo = -hi
    if hi <= lo:
        hi = lo + 1e-9
    none = np.zeros(values.shape, dtype=bool)
    return lo, hi, False, none, none


def _layout(fig, data: HeatmapData, n_rows: int, title_lines: int):
    """(axes, colour bar axes) placed from the label lengths, in inches."""
    width, height = fig.get_size_inches()
    y_chars = max([len(str(layer)) for layer in data.layers] + [1])
    x_lines = max([str(c).count("\n") + 1 for c in data.columns] + [1])
    left = 0.55 + _CHAR * y_chars
    right = 1.25
    top = 0.2 + 0.24 * title_lines
    bottom = 0.45 + 0.19 * x_lines
    ax = fig.add_axes((left / width, bottom / height, (width - left - right) / width, (height - top - bottom) / height))
    cax = fig.add_axes(
        ((width - right + 0.15) / width, bottom / height, 0.18 / width, (height - top - bottom) / height)
    )
    return ax, cax


def draw(
    data: HeatmapData, vmin: float | None = None, vmax: float | None = None, annotate: bool | None = None, figure=None
):
    """A matplotlib Figure of the grid (Agg backend; the caller saves or inspects it).
    `figure`: a Figure to clear and draw into when it has this grid's size (else a new one)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure

    values = np.asarray(data.values, dtype=np.float64)
    n_rows, n_cols = values.shape
    size = figure_size(n_rows, n_cols)
    if figure is not None and tuple(figure.get_size_inches()) == size:
        figure.clear()
        fig = figure
    else:
        fig = Figure(figsize=size, dpi=DPI)
        FigureCanvasAgg(fig)  # a renderer to measure text with (_row_linespacing)
    lo, hi, log, above, below = _range(data, values, vmin, vmax)
    width = max(20, int((size[0] - 0.3) / _TITLE_CHAR))
    title = textwrap.wrap(data.title, width, break_on_hyphens=False) or [""]
    quiet = floor_marks(data.noise_floor, data.below_floor, values.shape, data.unsure)
    if quiet.any():
        title += textwrap.wrap(floor_legend(data), width)
    ax, cax = _layout(fig, data, n_rows, len(title))
    shown = np.ma.masked_invalid(np.clip(values, lo, None) if log else values)
    norm = LogNorm(lo, hi, clip=False) if log else Normalize(lo, hi)
    image = ax.imshow(shown, cmap=data.cmap, aspect="auto", norm=norm, interpolation="nearest")
    literal = {"usetex": False, "parse_math": False}  # user text: never TeX or mathtext
    ax.set_xticks(range(n_cols), labels=list(data.columns), **literal)
    ax.set_yticks(range(n_rows), labels=[str(layer) for layer in data.layers], **literal)
    ax.set_xlabel("Generated Token")
    ax.set_ylabel(data.ylabel, **literal)
    ax.set_title("\n".join(title), **literal)
    extend = {(False, False): "neither", (True, False): "max", (False, True): "min", (True, True): "both"}
    fig.colorbar(
        image,
        cax=cax,
        extend=extend[(bool(above.any()), bool(below.any() and not log))],
        label=data.colorbar_label or DIVERGENCE_LABELS.get(data.divergence, data.divergence),
    )
    _mark(ax, above | (below if not log else np.zeros_like(below)))
    _dot(ax, quiet)
    _breaks(ax, data.breaks())
    if annotate is None:
        annotate = n_rows * n_cols <= 400
    if annotate:
        _annotate(ax, data, values, norm, lo if log else None, literal)
    return fig


def _mark(ax, clipped) -> None:
    """Hatch the cells beyond the colour range."""
    from matplotlib.patches import Rectangle

    for r, c in np.argwhere(clipped):
        ax.add_patch(
            Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch="///", edgecolor=(1, 1, 1, 0.5), linewidth=0)
        )


def _breaks(ax, gaps) -> None:
    """A thin dark line across the map between rows whose layers are not consecutive, so a
    jump (21 to 27) reads as one; the tick labels name both sides."""
    for r in gaps:
        ax.axhline(r + 0.5, color=GAP_COLOUR, linewidth=1.6, zorder=4, gid=f"layer-gap-{r}")


def floor_marks(noise_floor: float | None, below_floor: np.ndarray | None, shape, unsure=None) -> np.ndarray:
    """The cells to dot: below the noise floor (none when it was not measured), and on a
    difference map with intervals those whose interval includes 0 (`unsure`)."""
    marks = np.zeros(shape, dtype=bool)
    if noise_floor is not None and below_floor is not None:
        marks |= np.asarray(below_floor, dtype=bool)
    if unsure is not None:
        marks |= np.asarray(unsure, dtype=bool)
    return marks


def floor_legend(data: HeatmapData) -> str:
    """The title's line on the dots (short enough for the narrowest figure's one line)."""
    if data.unsure is not None:
        floor = "" if data.noise_floor is None else f" or under the noise floor ({data.noise_floor:.2g} nats)"
        return f"\u2022 not a difference: {percent(data.level or 0)} CI includes 0{floor}"
    return f"\u2022 below the noise floor ({data.noise_floor:.2g} nats)"


def _dot(ax, quiet) -> None:
    """A small dark dot, ringed in white (seen on light and dark colours), in the bottom-left
    corner of each cell below the noise floor; the axes keep their limits."""
    if not quiet.any():
        return
    rows, cols = np.nonzero(quiet)
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    ax.scatter(
        cols - 0.36,
        rows + 0.3,
        s=14,
        marker="o",
        c="#333333",
        edgecolors="white",
        linewidths=0.6,
        zorder=3,
        gid="below-noise-floor",
    )
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)


def _annotate(ax, data: HeatmapData, values, norm, floor, literal) -> None:
    """The value in each cell (n/a where none), white on dark colours, and `n=<count>` where
    fewer prompts reached it. `floor`: a log scale's bottom (smaller values take its colour).

    A column's values are drawn as one text per colour, a line per row with the line pitch
    set to the row height: a few text artists instead of one per cell, which halves the time
    a figure takes to render. Cells with a count below the maximum (two lines) are drawn one
    by one instead."""
    counts = data.counts
    full = None if counts is None else int(np.max(counts))
    n_rows, n_cols = values.shape
    texts = np.empty(values.shape, dtype=object)
    dark = np.zeros(values.shape, dtype=bool)
    for r in range(n_rows):
        for c in range(n_cols):
            value = values[r, c]
            texts[r, c] = cell_text(value)
            if np.isfinite(value):
                strength = float(np.clip(norm(value if floor is None else max(value, floor)), 0, 1))
                dark[r, c] = strength > 0.6 if data.cmap == "YlOrRd" else abs(strength - 0.5) > 0.3
    if counts is not None and full is not None and (counts < full).any():
        for r in range(n_rows):
            for c in range(n_cols):
                extra = f"\nn={int(counts[r, c])}" if counts[r, c] < full else ""
                ax.text(
                    c,
                    r,
                    texts[r, c] + extra,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark[r, c] else "black",
                    **literal,
                )
        return
    spacing = _row_linespacing(ax, n_rows)
    for c in range(n_cols):
        for colour, mask in (("black", ~dark[:, c]), ("white", dark[:, c])):
            if mask.any():
                column = "\n".join(t if m else "" for t, m in zip(texts[:, c], mask))
                ax.text(
                    c,
                    (n_rows - 1) / 2,
                    column,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color=colour,
                    linespacing=spacing,
                    **literal,
                )


_PITCH: dict = {}  # dpi -> line pitch (pixels) of an 8 pt text at linespacing 1


def _row_linespacing(ax, n_rows: int) -> float:
    """The linespacing that makes an 8 pt text's lines exactly one heatmap row apart: the row
    height over the pitch of lines at linespacing 1, measured once per dpi (as the installed
    matplotlib lays lines out)."""
    fig = ax.get_figure()
    if fig.dpi not in _PITCH:
        renderer = fig.canvas.get_renderer()
        heights = [
            fig.text(0, 0, "\n".join(["0"] * n), fontsize=8, linespacing=1.0).get_window_extent(renderer).height
            for n in (2, 3)
        ]
        for text in fig.texts[-2:]:
            text.remove()
        _PITCH[fig.dpi] = heights[1] - heights[0]
    row = ax.get_position().height * fig.get_size_inches()[1] * fig.dpi / n_rows
    return row / _PITCH[fig.dpi]


def save(data: HeatmapData, path, *more_paths, figure=None, **kwargs):
    """Draw and write the figure to each path (format from the suffix: .png, .svg, .pdf)."""
    import matplotlib

    fig = draw(data, figure=figure, **kwargs)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "klstore"}):
        for target in (path, *more_paths):  # PNG: zlib level 1, 30% faster to write, 15% larger
            png = str(target).lower().endswith(".png")
            # SVG without its date: a rebuild of the same numbers gives the same bytes
            options = {"pil_kwargs": {"compress_level": 1}} if png else {"metadata": {"Date": None}}
            fig.savefig(target, dpi=DPI, **options)
    return fig
