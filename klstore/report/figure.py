"""A grid as the report shows it: the grid's numbers and what the report decided about them.

The report's values flow one way. The data builders (aggregate, prompts, settling) return
immutable klstore.report.grid.Grid values; a `Figure` is made from a grid (`frame`): its colour
scale (klstore.report.scale) and its noise floor with the cells below it (klstore.report.floor);
klstore.report.observe then gives its sentences (`with_observations`, a new Figure), and the
drawing (klstore.report.plotting, .drawing, .interactive) and the site (klstore.report.site) read
figures. Nothing is written back into a grid. A `LensView` is the same for a lens figure
(klstore.report.lenses.LensFigure): its numbers and its sentences.

Pure numpy; never imports matplotlib, plotly or torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from klstore.report import floor
from klstore.report.grid import Grid
from klstore.report.lenses import LensFigure
from klstore.report.scale import Scale, bounds, choose
from klstore.spec import ReportSpec


@dataclass(frozen=True, eq=False)  # compared by identity, as its grid
class Figure:
    """One figure of the report: its grid, its colour scale (None: min..max), its noise floor
    (nats; None: not measured) with the cells whose |value| lies below it (`below_floor`, the
    grid's shape, read-only; None: none marked), its observations, and for a prompt's map shown
    in the index the site path of the prompt's own page."""

    grid: Grid
    scale: Scale | None = None
    noise_floor: float | None = None
    below_floor: np.ndarray | None = None
    observations: tuple[str, ...] = ()
    page: str | None = None

    def __post_init__(self):
        if self.below_floor is not None:
            self.below_floor.flags.writeable = False
        object.__setattr__(self, "observations", tuple(self.observations))

    @classmethod
    def of(cls, grid: Grid, scale: Scale | None = None, noise_floor: float | None = None, page=None) -> Figure:
        """The figure of a grid under this scale and noise floor (the cells below it computed)."""
        return cls(grid, scale, noise_floor, floor.below(grid.values, noise_floor), page=page)

    def with_observations(self, observations) -> Figure:
        return dataclasses.replace(self, observations=tuple(observations))

    def with_grid(self, grid: Grid) -> Figure:
        """The same scale and floor over another grid with the same numbers (one with its
        settling summary attached: klstore.report.settling.attach)."""
        return dataclasses.replace(self, grid=grid)


@dataclass(frozen=True, eq=False)
class LensView:
    """A lens figure of the report (klstore.report.lenses) with its observations."""

    lens: LensFigure
    observations: tuple[str, ...] = ()


def shared_scales(spec: ReportSpec, grids) -> dict:
    """section -> (lo, hi) over all its grids under the spec's colour scale (symmetric about 0
    where the section holds differences); empty unless the spec asks for shared scales."""
    if not spec.shared_scale:
        return {}
    scales = {}
    for section in {g.section for g in grids}:
        members = [g for g in grids if g.section == section]
        values = np.concatenate([g.values[np.isfinite(g.values)] for g in members] or [[]])
        if values.size:
            scales[section] = bounds(values, spec.color_scale, any(g.kind == "difference" for g in members))
    return scales


def frame(grid: Grid, spec: ReportSpec, floors: floor.Floors, shared: dict | None = None, page=None) -> Figure:
    """A grid's figure: its colour scale (its own, or its section's from `shared`, see
    shared_scales) and the noise floor of the runs its rows come from (floor.for_grid)."""
    chosen = choose(grid.values, spec.color_scale, grid.kind == "difference", (shared or {}).get(grid.section))
    return Figure.of(grid, chosen, floor.for_grid(grid, floors), page)
