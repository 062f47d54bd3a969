"""The value a report's data builders produce: one figure's numbers and identity, immutable.

A `Grid` is what klstore.report.aggregate (aggregates and differences), klstore.report.prompts
(one prompt's map) and klstore.report.settling (the settling depth behind a figure) read from
the store: values and counts per (layer, generated token), the labels that say what it is, a
difference's bootstrap interval, and the statistics its hover shows. Nothing downstream writes
into it: the colour scale, the noise floor and the observations are computed from it into a
klstore.report.figure.Figure, and a builder that adds to a grid (settling) returns a new one.

Also here: the ids and column labels a grid is named by (`slug`, `column_labels`, `shown_token`).
Pure numpy; never imports matplotlib, plotly or torch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from klstore.output import visible_token
from klstore.report.intervals import Interval


def _frozen(value):
    """A numpy array made read-only (others as they are)."""
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    return value


@dataclass(frozen=True, eq=False)  # compared by identity: its arrays have no single truth value
class Grid:
    """One figure's numbers: values (len(layers), len(columns)), NaN where no value.

    `labels` and `hover` are read-only mappings and every array in them is read-only."""

    fig_id: str
    section: str
    title: str
    layers: tuple
    columns: tuple
    values: np.ndarray
    counts: np.ndarray
    n_prompts: int
    divergence: str
    kind: str  # "aggregate" | "difference" | "prompt"
    labels: Any  # model, probe, prompt_group, ... (a read-only mapping)
    inputs: tuple = ()  # (model, probe) partitions it reads
    ylabel: str = "Layer"
    # for the interactive figure (klstore.report.interactive); arrays are (len(layers), len(columns))
    hover: Any = field(default_factory=dict)  # aggregate: mean, median, max, max_at; prompt: lens tokens
    settling: dict | None = None  # the settling depth behind it (klstore.report.settling)
    # rows r with a break line below them (the layers jump); None: from the layer numbers
    # (plotting.layer_gaps); relative-depth comparisons set it from the shallower model's layers
    gaps: tuple | None = None
    # differences: the bootstrap interval of each cell (klstore.report.compare, .intervals)
    interval: Interval | None = None

    def __post_init__(self):
        _frozen(self.values)
        _frozen(self.counts)
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        object.__setattr__(self, "hover", MappingProxyType({k: _frozen(v) for k, v in self.hover.items()}))

    def with_settling(self, settling: dict | None) -> Grid:
        """The same grid with its settling summary (klstore.report.settling.attach)."""
        return dataclasses.replace(self, settling=settling)


def slug(*parts) -> str:
    """A figure id: the parts joined, made safe for a file name (letters, digits, '.', '_', '-'),
    with 8 hex digits of their SHA-256 so that ids stay unique."""
    text = "-".join(str(p) for p in parts)
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:80]
    return f"{safe}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


@functools.lru_cache(maxsize=1 << 17)
def shown_token(text) -> str:
    """klstore.output.visible_token, remembered: a report shows the same tokens many times."""
    return visible_token(text)


def column_labels(n: int, texts=None) -> tuple[str, ...]:
    """Gen0..Gen{n-1}, with the token text beneath when given (whitespace made visible)."""
    if texts is None:
        return tuple(f"Gen{i}" for i in range(n))
    return tuple(f"Gen{i}\n{_short(t)}" for i, t in enumerate(texts))


def _short(text) -> str:
    shown = visible_token(text)
    return shown if len(shown) <= 12 else shown[:11] + "\u2026"
