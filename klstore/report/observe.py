"""Numbers -> sentences: what an analyst would say about a grid (peaks, standout cells,
columns and layers, early ends of sequence, and for differences who is higher where).

Reads only the grid's arrays and labels; units are nats.
"""

from __future__ import annotations

import numpy as np

from klstore.report.aggregate import Grid


def _cell(grid: Grid, r: int, c: int) -> str:
    return f"layer {grid.layers[r]}, Gen{c}" if grid.ylabel == "Layer" else f"depth {grid.layers[r]}, Gen{c}"


def observe(grid: Grid) -> list[str]:
    """What an analyst would say about the grid, from its numbers."""
    v = grid.values
    finite = v[np.isfinite(v)]
    unit = "nats"
    if finite.size == 0:
        return ["No finite values in this grid."]
    mean, std, lo, hi = float(finite.mean()), float(finite.std()), float(finite.min()), float(finite.max())
    out = []
    if grid.kind == "difference":
        a, b = grid.labels["a"], grid.labels["b"]
        higher = int((finite > 0).sum())
        r, c = np.unravel_index(np.nanargmax(np.abs(np.where(np.isfinite(v), v, 0))), v.shape)
        out.append(f"{a} is higher than {b} in {higher} of {finite.size} cells; the mean difference is "
                   f"{mean:+.3g} {unit}.")
        out.append(f"The largest gap is at {_cell(grid, r, c)}: {v[r, c]:+.3g} {unit}.")
        if hi - lo <= 0.05 * max(abs(mean), 1e-12) or max(abs(lo), abs(hi)) < 1e-3:
            out.append("The difference is flat: the two are practically the same here.")
        return out
    spread = hi - lo
    if spread <= 0.05 * max(abs(mean), 1e-12) or spread < 1e-6:
        out.append(f"The grid is flat: every cell is within {spread:.3g} {unit} of the others "
                   f"(mean {mean:.3g} {unit}).")
        return out
    r, c = np.unravel_index(np.nanargmax(np.where(np.isfinite(v), v, -np.inf)), v.shape)
    out.append(f"{grid.divergence} peaks at {_cell(grid, r, c)} with {v[r, c]:.3g} {unit}, "
               f"{v[r, c] / mean:.1f}x the grid mean of {mean:.3g} {unit}.")
    col_means = np.nanmean(np.where(np.isfinite(v), v, np.nan), axis=0)
    if v.shape[1] > 1:
        best = int(np.nanargmax(col_means))
        others = float(np.nanmean(np.delete(col_means, best)))
        if others > 0 and col_means[best] / others >= 1.3:
            out.append(f"Gen{best} stands out: its mean {col_means[best]:.3g} {unit} is "
                       f"{col_means[best] / others:.1f}x that of the other tokens ({others:.3g}).")
        else:
            out.append(f"The generated tokens are alike: column means range from {np.nanmin(col_means):.3g} "
                       f"to {np.nanmax(col_means):.3g} {unit}.")
    row_means = np.nanmean(np.where(np.isfinite(v), v, np.nan), axis=1)
    if v.shape[0] > 2:
        top = np.argsort(-np.nan_to_num(row_means, nan=-np.inf))[:3]
        names = ", ".join(f"{grid.layers[i]} ({row_means[i]:.3g})" for i in top)
        noun = "Layers" if grid.ylabel == "Layer" else "Depths"
        out.append(f"{noun} with the highest mean {grid.divergence}: {names}.")
        third = max(1, len(row_means) // 3)
        early, late = float(np.nanmean(row_means[:third])), float(np.nanmean(row_means[-third:]))
        if early > 0 and late > 0 and max(early, late) / min(early, late) >= 2:
            trend = "falls" if early > late else "rises"
            out.append(f"{grid.divergence} {trend} with depth: {early:.3g} {unit} on average in the first third "
                       f"of the listed layers, {late:.3g} in the last third.")
    outliers = np.argwhere(np.isfinite(v) & (v > mean + 2 * std)) if std > 0 else []
    if len(outliers):
        listed = "; ".join(f"{_cell(grid, r, c)} ({v[r, c]:.3g})" for r, c in outliers[:5])
        more = f" and {len(outliers) - 5} more" if len(outliers) > 5 else ""
        out.append(f"{len(outliers)} cell{'s are' if len(outliers) > 1 else ' is'} more than two standard "
                   f"deviations above the mean: {listed}{more}.")
    if grid.kind == "aggregate" and grid.counts.size and grid.counts.max() > grid.counts.min():
        full = int(grid.counts.max())
        short = sorted({int(c) for c in np.where(grid.counts.min(axis=0) < full)[0]})
        parts = ", ".join(f"Gen{c} by {int(grid.counts[:, c].min())}" for c in short[:5])
        out.append(f"Not every prompt reached every token (early end of sequence): of {full}, {parts}.")
    return out
