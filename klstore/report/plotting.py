"""Heatmaps in the style of the seed figure. Receives plain arrays; knows nothing of models.

y axis "Layer" (the listed layers top to bottom), x axis "Generated Token"
(Gen0..GenN-1, or token texts), YlOrRd (light yellow = low, dark red = high),
colour bar "<divergence> (nats)", values annotated in the cells when the grid is small.
Text that may come from users (titles, token texts, labels) is drawn with mathtext
off, so `$x$` shows as typed instead of being parsed as TeX.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klstore.spec import DIVERGENCES

DIVERGENCE_LABELS = {name: f"{label} (nats)" for name, label in DIVERGENCES.items()}


@dataclass(frozen=True)
class HeatmapData:
    """A layers x tokens grid to draw. values: (len(layers), len(columns)); NaN = no value."""

    values: np.ndarray
    layers: tuple[int, ...]
    columns: tuple[str, ...]
    title: str
    divergence: str = "kl"
    counts: np.ndarray | None = None  # prompts behind each cell, shown where below the maximum
    cmap: str = "YlOrRd"  # differences use a diverging map centred on 0 ("RdBu_r")
    colorbar_label: str | None = None  # default: from the divergence
    ylabel: str = "Layer"


def column_labels(n: int, texts=None) -> tuple[str, ...]:
    """Gen0..Gen{n-1}, with the token text beneath when given."""
    if texts is None:
        return tuple(f"Gen{i}" for i in range(n))
    return tuple(f"Gen{i}\n{_shown(t)}" for i, t in enumerate(texts))


def _shown(text: str) -> str:
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    return repr(text)[1:-1] if text.strip() == "" else text[:12]


def draw(data: HeatmapData, vmin: float | None = None, vmax: float | None = None,
         annotate: bool | None = None):
    """A matplotlib Figure of the grid (Agg backend; the caller saves or inspects it)."""
    from matplotlib.figure import Figure

    values = np.asarray(data.values, dtype=np.float64)
    n_rows, n_cols = values.shape
    fig = Figure(figsize=(max(4.5, 1.1 * n_cols + 2.5), max(3.0, 0.42 * n_rows + 1.6)))
    ax = fig.add_subplot(1, 1, 1)
    masked = np.ma.masked_invalid(values)
    finite = values[np.isfinite(values)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if data.cmap != "YlOrRd" and vmin is None and vmax is None:  # diverging: symmetric about 0
        hi = max(abs(lo), abs(hi))
        lo = -hi
    if hi <= lo:
        hi = lo + 1e-9
    image = ax.imshow(masked, cmap=data.cmap, aspect="auto", vmin=lo, vmax=hi, interpolation="nearest")
    literal = {"usetex": False, "parse_math": False}  # user text: never TeX or mathtext
    ax.set_xticks(range(n_cols), labels=list(data.columns), **literal)
    ax.set_yticks(range(n_rows), labels=[str(layer) for layer in data.layers], **literal)
    ax.set_xlabel("Generated Token")
    ax.set_ylabel(data.ylabel, **literal)
    ax.set_title(data.title, **literal)
    fig.colorbar(image, ax=ax, label=data.colorbar_label or DIVERGENCE_LABELS.get(data.divergence, data.divergence))
    if annotate is None:
        annotate = n_rows * n_cols <= 400
    if annotate:
        full = None if data.counts is None else int(np.max(data.counts))
        for r in range(n_rows):
            for c in range(n_cols):
                value = values[r, c]
                if not np.isfinite(value):
                    text, colour = "n/a", "black"
                else:
                    text = f"{value:.2f}"
                    strength = (value - lo) / (hi - lo)
                    dark = strength > 0.6 if data.cmap == "YlOrRd" else abs(strength - 0.5) > 0.3
                    colour = "white" if dark else "black"
                if full is not None and data.counts[r, c] < full:
                    text += f"\nn={int(data.counts[r, c])}"
                ax.text(c, r, text, ha="center", va="center", fontsize=8, color=colour, **literal)
    fig.tight_layout()
    return fig


def save(data: HeatmapData, path, *more_paths, **kwargs):
    """Draw and write the figure to each path (format from the suffix: .png, .svg, .pdf)."""
    fig = draw(data, **kwargs)
    for target in (path, *more_paths):
        fig.savefig(target, dpi=110)
    return fig
