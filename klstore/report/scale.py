"""Colour scales: where a heatmap's colours start and end, and which cells fall off the end.

One rule serves the matplotlib figures (PNG/SVG) and the interactive ones, so both show
the same colours for the same numbers. Three kinds (the report spec's `color_scale`):

- `linear`: from the smallest to the largest value;
- `log`: log10 of the value, from the largest value down four decades (`LOG_DECADES`);
  smaller values, zeros included, take the bottom colour and are counted as below the scale;
- `robust`: linear, but the top ends at Tukey's far-out fence, Q3 + 3 x IQR of the values,
  when a value lies beyond it (otherwise at the largest value, as `linear`). A plain high
  percentile cannot do this job: when one whole layer is the outlier (Gemma-3's logit lens,
  mean over the demo prompts: up to 142 nats at layer 0, at most 29 below it), its 99th
  percentile (140 nats) still lies inside that layer; the fence is 66 nats. Cells beyond the
  fence take the top colour and are marked. It is the default because it changes nothing in
  a figure without outliers.

Differences (signed, centred on 0) use a scale symmetric about 0: `robust` fences |value|,
and `log` falls back to linear (a log of a signed difference would hide its sign).
Pure numpy; never imports matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import numpy as np

from klstore.spec import ReportSpec

SCALES = get_args(ReportSpec.model_fields["color_scale"].annotation)  # linear, log, robust
DEFAULT_SCALE = ReportSpec.model_fields["color_scale"].default
FENCE_IQRS = 3.0  # Tukey's "far out": beyond Q3 + 3 IQR
LOG_DECADES = 4.0  # a log scale spans this many powers of ten below its top


@dataclass(frozen=True)
class Scale:
    """The colour range of one figure: `lo`..`hi` in the values' units (nats).

    `above` / `below`: boolean masks, the grid's shape, of cells drawn at the top / bottom
    colour because they lie beyond the range (marked in the figures)."""

    kind: str  # the kind asked for: linear | log | robust
    lo: float
    hi: float
    log: bool  # colours follow log10(value) (kind "log" on a non-diverging grid)
    diverging: bool
    above: np.ndarray
    below: np.ndarray

    @property
    def n_above(self) -> int:
        return int(self.above.sum())

    @property
    def n_below(self) -> int:
        return int(self.below.sum())

    def note(self, unit: str = "nats") -> str | None:
        """One sentence on the cells beyond the range, or None when there are none."""
        parts = []
        if self.n_above:
            parts.append(
                f"{_cells(self.n_above)} above the colour scale's top of {self.hi:.3g} {unit} "
                "(drawn in the top colour and marked)"
            )
        if self.n_below and self.log:
            parts.append(
                f"{_cells(self.n_below)} below the log scale's floor of {self.lo:.3g} {unit} "
                "(drawn in the bottom colour)"
            )
        elif self.n_below:
            parts.append(
                f"{_cells(self.n_below)} below the colour scale's bottom of {self.lo:.3g} {unit} "
                "(drawn in the bottom colour and marked)"
            )
        return "; ".join(parts).capitalize() + "." if parts else None


def _cells(n: int) -> str:
    return f"{n} cell{'s' if n != 1 else ''}"


def fence(values: np.ndarray) -> float:
    """Tukey's far-out fence Q3 + 3 IQR of the finite values (the robust scale's top)."""
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 + FENCE_IQRS * (q3 - q1))


def bounds(values, kind: str, diverging: bool) -> tuple[float, float]:
    """(lo, hi) of the colour range for these values under the scale `kind`."""
    if kind not in SCALES:
        raise ValueError(f"unknown colour scale {kind!r}")
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (-1.0, 1.0) if diverging else (0.0, 1.0)
    if diverging:
        size = np.abs(v)
        top = float(size.max())
        if kind == "robust" and fence(size) > 0:
            top = min(top, fence(size))
        top = top if top > 0 else 1e-9
        return -top, top
    lo, hi = float(v.min()), float(v.max())
    if kind == "robust":
        hi = min(hi, fence(v))
        hi = hi if hi > lo else float(v.max())
    elif kind == "log":
        hi = hi if hi > 0 else 1.0
        positive = v[v > 0]
        floor = hi * 10.0**-LOG_DECADES
        lo = max(float(positive.min()), floor) if positive.size else floor
    if hi <= lo:
        hi = lo + 1e-9
    return lo, hi


def choose(values, kind: str, diverging: bool, shared: tuple[float, float] | None = None) -> Scale:
    """The scale of one grid: its own bounds, or `shared` ones (a section's common scale),
    and which of its cells lie beyond them."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = shared if shared is not None else bounds(v, kind, diverging)
    finite = np.isfinite(v)
    tol = 1e-9 * max(abs(lo), abs(hi), 1.0)
    above = finite & (v > hi + tol)
    below = finite & (v < lo - tol)
    return Scale(kind, float(lo), float(hi), kind == "log" and not diverging, diverging, above, below)
