"""Figures -> interactive figures: plotly.js figure objects (plain dicts) and safe JSON for pages.

The site ships plotly.js once (`assets/plotly.min.js`, from the plotly package's offline
bundle); each page carries its figures as JSON in a `<script type="application/json">`
element that `assets/report.js` parses and draws. `script_json` escapes `<`, `>` and `&`
as `\\u003c` etc., so no text inside can close the element or start markup.

Plotly renders a subset of HTML in titles, tick labels and hover labels (`<b>`, `<br>`,
entities). Every text that comes from the store (model labels, prompt ids and texts, token
texts) therefore goes through `_text`: whitespace made visible (klstore.output.visible_token
for tokens) and HTML-escaped, so plotly shows `<script>` as those characters and never
as a tag.

Hover, per cell: the value, the number of prompts behind it, and
- on per-prompt maps: the top-k tokens of Q with probabilities, the generated token, its rank
  and log-probability under Q;
- on aggregate maps: mean, median, and the prompt with the largest value (a click on the cell
  in the enlarged figure opens that prompt's map, when it has a page);
- on differences: the two values subtracted, and the cell's bootstrap interval
  (klstore.report.intervals) with "not a difference" where it includes 0 (or there is none).
Cells beyond a robust scale are marked with a triangle (log: below the floor, not marked).
Cells below the runs' noise floor (klstore.report.floor) get a small dot in their bottom-left
corner, as in the PNG, and the hover line "below the noise floor (X nats)".

Line figures (`lines_figure`, from a klstore.report.lineplot.LinesData: the Lenses section) get
one trace per series, on the same log axis as the PNG, with each point's own value and the
series' extra lines on hover.
"""

from __future__ import annotations

import functools
import html
import json
import math

import numpy as np

from klstore.output import visible_token
from klstore.report import intervals
from klstore.report.figure import Figure
from klstore.report.grid import Grid
from klstore.report.lineplot import COLOURS, LinesData, colour, shown
from klstore.report.plotting import DIVERGENCE_LABELS, GAP_COLOUR, cell_text, floor_marks, layer_gaps

# ColorBrewer's YlOrRd and RdBu (reversed), as matplotlib draws them
YLORRD = ["#ffffcc", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#bd0026", "#800026"]
RDBU_R = [
    "#053061",
    "#2166ac",
    "#4393c3",
    "#92c5de",
    "#d1e5f0",
    "#f7f7f7",
    "#fddbc7",
    "#f4a582",
    "#d6604d",
    "#b2182b",
    "#67001f",
]
ANNOTATE_MAX = 400  # cells; larger grids show their values on hover only


def script_json(value) -> str:
    """JSON that is safe inside a `<script>` element: `<`, `>`, `&`, U+2028 and U+2029 escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escape)
    return text


def _text(value) -> str:
    """A store string for plotly's HTML-like text: one line, with &, < and > as entities (which
    plotly shows as the characters; it has no attributes to break out of once no tag can form,
    and it would show &quot; literally)."""
    return html.escape(" ".join(str(value).splitlines()), quote=False)


@functools.lru_cache(maxsize=1 << 17)
def _token(text) -> str:
    """A token for hover text: whitespace made visible, in quotes, HTML-escaped."""
    return html.escape(f'"{visible_token(text)}"', quote=False)


def _num(value, digits: int = 4):
    """A JSON number (None where not finite)."""
    if value is None:
        return None
    value = float(value)
    return float(f"{value:.{digits}g}") if math.isfinite(value) else None


def _colorscale(colours) -> list:
    return [[i / (len(colours) - 1), c] for i, c in enumerate(colours)]


def figure(shown: Figure, prompt_pages: dict | None = None) -> dict:
    """The plotly figure of a report Figure: {"data", "layout", "links"}; `links[r][c]` is the
    site path a click on that cell opens (aggregate maps: the largest value's prompt page), or
    None. `prompt_pages`: (model, run_id, prompt_id) -> site path of the prompts that have a page."""
    grid, scale = shown.grid, shown.scale
    values = np.asarray(grid.values, dtype=np.float64)
    n_rows, n_cols = values.shape
    z = values if scale is None or not scale.log else np.log10(np.clip(values, scale.lo, None))
    hover, links = _hover(shown, prompt_pages or {})
    heat = {
        "type": "heatmap",
        "z": [[_num(v, 6) for v in row] for row in z],
        "x": list(range(n_cols)),
        "y": list(range(n_rows)),
        "colorscale": _colorscale(RDBU_R if grid.kind == "difference" else YLORRD),
        "customdata": hover,
        "hovertemplate": "%{customdata}<extra></extra>",
        "colorbar": _colorbar(grid, scale),
        "xgap": 1,
        "ygap": 1,
    }
    if scale is not None:
        heat["zmin"], heat["zmax"] = (math.log10(scale.lo), math.log10(scale.hi)) if scale.log else (scale.lo, scale.hi)
    if n_rows * n_cols <= ANNOTATE_MAX:
        heat["text"] = [[cell_text(v) for v in row] for row in values]
        heat["texttemplate"] = "%{text}"
        heat["textfont"] = {"size": 10}
    data = [heat]
    if scale is not None and scale.n_above:
        rows, cols = np.nonzero(scale.above)
        data.append(
            {
                "type": "scatter",
                "mode": "markers",
                "x": (cols + 0.38).tolist(),
                "y": (rows - 0.28).tolist(),
                "marker": {"symbol": "triangle-up", "size": 7, "color": "#ffffff"},  # the cell's top right
                "hoverinfo": "skip",
                "showlegend": False,
                "name": "above the scale",
            }
        )
    unsure = intervals.unsure(grid.values, grid.interval)
    quiet = floor_marks(shown.noise_floor, shown.below_floor, grid.values.shape, unsure)
    if quiet.any():
        rows, cols = np.nonzero(quiet)
        data.append(
            {
                "type": "scatter",
                "mode": "markers",
                "x": (cols - 0.36).tolist(),
                "y": (rows + 0.3).tolist(),
                "marker": {
                    "symbol": "circle",
                    "size": 5,
                    "color": "#333333",  # the cell's bottom left
                    "line": {"width": 1, "color": "#ffffff"},
                },
                "hoverinfo": "skip",
                "showlegend": False,
                "name": "below the noise floor" if unsure is None else "not a difference",
            }
        )
    return {"data": data, "layout": _layout(grid, n_rows, n_cols), "links": links}


def _colorbar(grid: Grid, scale) -> dict:
    label = DIVERGENCE_LABELS.get(grid.divergence, grid.divergence)
    bar = {
        "title": {"text": f"Difference in {label}" if grid.kind == "difference" else label, "side": "right"},
        "thickness": 14,
    }
    if scale is not None and scale.log:
        lo, hi = math.floor(math.log10(scale.lo)), math.ceil(math.log10(scale.hi))
        bar["tickvals"] = list(range(lo, hi + 1))
        bar["ticktext"] = [f"{10.0**k:g}" for k in range(lo, hi + 1)]
    return bar


def _layout(grid: Grid, n_rows: int, n_cols: int) -> dict:
    layout = _heatmap_layout(grid, n_rows, n_cols)
    gaps = layer_gaps(grid.layers) if grid.gaps is None else grid.gaps
    if gaps:  # a break line between rows whose layers are not consecutive, as in the PNG
        layout["shapes"] = [
            {
                "type": "line",
                "name": f"layer gap {_text(grid.layers[r])}-{_text(grid.layers[r + 1])}",
                "xref": "x",
                "yref": "y",
                "x0": -0.5,
                "x1": n_cols - 0.5,
                "y0": r + 0.5,
                "y1": r + 0.5,
                "line": {"color": GAP_COLOUR, "width": 2},
                "layer": "above",
            }
            for r in gaps
        ]
    return layout


def _heatmap_layout(grid: Grid, n_rows: int, n_cols: int) -> dict:
    return {
        "title": {"text": _text(grid.title), "font": {"size": 13}, "x": 0.02, "xanchor": "left"},
        "xaxis": {
            "tickvals": list(range(n_cols)),
            "ticktext": [_column(c) for c in grid.columns],
            "title": {"text": "Generated Token"},
            "showgrid": False,
            "zeroline": False,
        },
        "yaxis": {
            "tickvals": list(range(n_rows)),
            "ticktext": [_text(layer) for layer in grid.layers],
            "autorange": "reversed",
            "title": {"text": _text(grid.ylabel)},
            "showgrid": False,
            "zeroline": False,
        },
        "margin": {"l": 60, "r": 20, "t": 40, "b": 60},
        "height": max(300, 18 * n_rows + 140),
        "hoverlabel": {"align": "left"},
    }


def _column(label: str) -> str:
    """An x tick label: 'Gen2' or 'Gen2<br>␣the' (column_labels already made the token visible)."""
    return "<br>".join(_text(part) for part in str(label).split("\n"))


def _hover(shown: Figure, pages: dict) -> tuple[list, list]:
    """Per cell: the hover text (HTML for plotly, store strings escaped) and the link a click opens."""
    grid = shown.grid
    n_rows, n_cols = grid.values.shape
    hover: list[list[str]] = [[""] * n_cols for _ in range(n_rows)]  # every cell is filled in below
    links: list[list[str | None]] = [[None] * n_cols for _ in range(n_rows)]
    cell = {"aggregate": _aggregate_cell, "prompt": _prompt_cell, "difference": _difference_cell}[grid.kind]
    quiet = floor_marks(shown.noise_floor, shown.below_floor, grid.values.shape)
    note = (
        (
            f"<i>{'not a difference: ' if grid.kind == 'difference' else ''}"
            f"below the noise floor ({shown.noise_floor:.2g} nats)</i>"
        )
        if quiet.any()
        else ""
    )
    for r in range(n_rows):
        for c in range(n_cols):
            hover[r][c], links[r][c] = cell(grid, r, c, pages)
            if quiet[r, c]:
                hover[r][c] += "<br>" + note
    return hover, links


def _where(grid: Grid, r: int, c: int) -> str:
    noun = "layer" if grid.ylabel == "Layer" else "depth"
    column = str(grid.columns[c]).replace("\n", " ")
    return f"<b>{noun} {_text(grid.layers[r])}, {_text(column)}</b>"


def _value(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.4g}"


def _aggregate_cell(grid: Grid, r: int, c: int, pages: dict):
    h = grid.hover
    n = int(grid.counts[r, c])
    lines = [
        _where(grid, r, c),
        f"{grid.divergence} {_value(grid.values[r, c])} nats ({h.get('aggregate', 'mean')} over prompts)",
        f"{n} prompt{'s' if n != 1 else ''}",
    ]
    link = None
    if h:
        lines.append(f"mean {_value(h['mean'][r, c])} · median {_value(h['median'][r, c])}")
        at = h["max_at"][r, c]
        if at:
            lines.append(
                f"largest {_value(h['max'][r, c])}: prompt {_text(at['prompt_id'])}"
                + ("" if "model" in grid.labels else f" ({_text(at['model'])})")
            )
            link = pages.get((at["model"], at["run_id"], at["prompt_id"]))
            if link:
                lines.append("<i>click (enlarged) to open its map</i>")
    return "<br>".join(lines), link


def _prompt_cell(grid: Grid, r: int, c: int, pages: dict):
    h = grid.hover
    lines = [_where(grid, r, c), f"{grid.divergence} {_value(grid.values[r, c])} nats (1 prompt)"]
    tokens = h.get("tokens") or []
    generated = tokens[c] if c < len(tokens) else None
    rank, logq = h["gen_rank"][r, c], h["gen_logq"][r, c]
    gen_line = f"generated Gen{c}: {_token(generated)}"
    if np.isfinite(rank):
        gen_line += f", rank {int(rank)} under Q (log Q {logq:.3g})"
    lines.append(gen_line)
    topk = h["topk"][r, c]
    if topk:
        lines.append(f"top-{len(topk)} of Q:")
        lines += [f"{i}. {_token(text)}  {prob:.3f}" for i, (text, prob) in enumerate(topk, 1)]
    else:
        lines.append("top-k tokens not stored (topk = 0, or a run from before lens tokens)")
    return "<br>".join(lines), None


def _difference_cell(grid: Grid, r: int, c: int, pages: dict):
    h = grid.hover
    a, b = grid.labels["a"], grid.labels["b"]
    lines = [_where(grid, r, c), f"{_text(a)} minus {_text(b)}: {_value(grid.values[r, c])} nats"]
    if h:
        lines.append(f"{_text(a)} {_value(h['a'][r, c])} · {_text(b)} {_value(h['b'][r, c])}")
    n = int(grid.counts[r, c])
    lines.append(f"{n} prompt{'s' if n != 1 else ''} behind it (the smaller side)")
    ci = grid.interval
    if ci is not None:
        lines.append(f"{ci.cell(r, c)} ({'paired' if ci.paired else 'unpaired'} bootstrap, {ci.resamples} resamples)")
        if np.isfinite(grid.values[r, c]) and not ci.excludes_zero()[r, c]:
            why = "no interval"
            if np.isfinite(ci.low[r, c]):
                why = f"the {intervals.percent(ci.level)} interval includes 0"
            lines.append(f"<i>not a difference: {why}</i>")
    return "<br>".join(lines), None


def lines_figure(data: LinesData) -> dict:
    """The plotly figure of a LinesData: {"data", "layout", "links": []} (nothing to click)."""
    traces = []
    for i, series in enumerate(data.series):
        y, low = shown(data, series)
        hover = []
        for k, (x, value) in enumerate(zip(series.x, np.asarray(series.y, dtype=np.float64))):
            lines = [f"<b>{_text(series.label)}</b>", f"layer {_text(x)}: {_value(value)} nats"]
            if low[k]:
                lines.append(f"<i>drawn at {data.y_min:g} (the axis bottom)</i>")
            if k < len(series.hover):
                lines.append(_text(series.hover[k]))
            hover.append("<br>".join(lines))
        traces.append(
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": _text(series.label),
                "x": [int(x) for x in series.x],
                "y": [_num(v, 6) for v in y],
                "line": {"color": colour(i, series), "dash": "dash" if series.dashed else "solid", "width": 2},
                "marker": {
                    "size": [8 if flag else 5 for flag in low],
                    "color": ["#ffffff" if flag else colour(i, series) for flag in low],
                    "line": {"width": 1.5, "color": colour(i, series)},
                },
                "customdata": hover,
                "hovertemplate": "%{customdata}<extra></extra>",
            }
        )
    layout = {
        "title": {"text": _text(data.title), "font": {"size": 13}, "x": 0.02, "xanchor": "left"},
        "xaxis": {"title": {"text": _text(data.xlabel)}, "zeroline": False},
        "yaxis": {"title": {"text": _text(data.ylabel)}, "type": "log" if data.log_y else "linear"},
        "margin": {"l": 70, "r": 20, "t": 50, "b": 50},
        "height": 420,
        "legend": {"font": {"size": 11}},
        "colorway": list(COLOURS),
        "hoverlabel": {"align": "left"},
    }
    return {"data": traces, "layout": layout, "links": []}
