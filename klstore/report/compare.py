"""Store rows -> per-prompt cells -> the bootstrap intervals of the report's comparison maps.

`fetch` reads one (model, probe)'s cells per prompt with one SQL query (and one for the list of
prompts), every value a parameter: a `PromptCells` whose `Sample` holds, per prompt (one run's
prompt) and cell, the sum of its values and their count. `models` and `groups` then give the
`klstore.report.intervals.Interval` of a model-vs-model or group-vs-group map over exactly the
map's rows and columns:

- model vs model is **paired** when both sides hold the same prompt ids, each once (the usual
  case: both models ran the same prompt set); the other side's prompts are put in the first's
  order and one resample of prompt indices serves both. Otherwise (other prompts, or a prompt in
  several runs of a side) it is **unpaired**.
- group vs group is unpaired (a prompt has one group): each group of the model and probe is
  resampled within itself, stream k for the k-th group by name; "the other groups" (more than 4
  groups) is the mean of their means in every replicate, as on the map.

The statistic is the spec's `aggregate`; level, resamples and seed are the spec's `confidence`,
`resamples` and `bootstrap_seed`. This module never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klstore.report import intervals
from klstore.report.intervals import MIN_PROMPTS, Interval, Sample
from klstore.spec import ReportSpec


@dataclass(frozen=True, eq=False)
class PromptCells:
    """One (model, probe)'s stored cells per prompt: `units` ((run_id, prompt_id) in order),
    their `groups`, the stored `layers` (sorted) and `sample` (n_units, len(layers), n_tokens)."""

    units: tuple
    groups: tuple
    layers: tuple
    sample: Sample

    def select(self, layers, n_cols: int, units=None) -> Sample:
        """The cells of these layers (values; a layer not stored has no value) and the first
        n_cols tokens, of the prompts `units` (positions; default all)."""
        index = {layer: i for i, layer in enumerate(self.layers)}
        s = self.sample if units is None else self.sample.take(np.asarray(units, dtype=np.int64))
        shape = (s.n, len(layers), n_cols)
        sums, counts = np.zeros(shape), np.zeros(shape)
        have = min(n_cols, s.sums.shape[2])
        for row, layer in enumerate(layers):
            if layer in index:
                sums[:, row, :have] = s.sums[:, index[layer], :have]
                counts[:, row, :have] = s.counts[:, index[layer], :have]
        return Sample(sums, counts)


def fetch(con, where, divergence: str, model: str, probe: str) -> PromptCells:
    """The per-prompt cells of one model and probe under `where` (a report Filter: `sql` with
    `$name` placeholders and its `params`; `divergence` is a REPORT_VALUES name, checked by the
    spec)."""
    one = where.and_("model = $cmp_model AND probe = $cmp_probe", cmp_model=model, cmp_probe=probe)
    units = con.execute(
        f"SELECT run_id, prompt_id, any_value(prompt_group) FROM kl WHERE {one.sql} "
        "GROUP BY run_id, prompt_id ORDER BY run_id, prompt_id",
        one.params,
    ).fetchall()
    rows = con.execute(
        f"""SELECT u.unit, c.layer, c.gen_idx, c.v
        FROM (SELECT run_id, prompt_id, layer, gen_idx, {divergence} AS v FROM kl WHERE {one.sql}) c
        JOIN (SELECT run_id, prompt_id, (row_number() OVER (ORDER BY run_id, prompt_id) - 1)::BIGINT AS unit
              FROM (SELECT DISTINCT run_id, prompt_id FROM kl WHERE {one.sql})) u
        USING (run_id, prompt_id)""",
        one.params,
    ).fetchnumpy()
    unit = np.asarray(rows["unit"], dtype=np.int64)
    layer = np.asarray(rows["layer"], dtype=np.int64)
    gen_idx = np.asarray(rows["gen_idx"], dtype=np.int64)
    value = np.asarray(rows["v"], dtype=np.float64)
    layers = np.unique(layer)
    n, n_layers, n_cols = len(units), len(layers), int(gen_idx.max()) + 1 if gen_idx.size else 0
    flat = (unit * n_layers + np.searchsorted(layers, layer)) * n_cols + gen_idx
    size = n * n_layers * n_cols
    sums = np.bincount(flat, weights=value, minlength=size).reshape(n, n_layers, n_cols)
    counts = np.bincount(flat, minlength=size).reshape(n, n_layers, n_cols).astype(np.float64)
    return PromptCells(
        tuple((str(r), str(p)) for r, p, _ in units),
        tuple(str(g) for _, _, g in units),
        tuple(int(x) for x in layers),
        Sample(sums, counts),
    )


def _settings(spec: ReportSpec) -> dict:
    return {"level": spec.confidence, "resamples": spec.resamples, "seed": spec.bootstrap_seed}


def models(a: PromptCells, b: PromptCells, rows_a, rows_b, n_cols: int, spec: ReportSpec) -> Interval:
    """The interval of model A - model B over layers `rows_a` of A against `rows_b` of B (layer
    numbers, row by row) and the first n_cols tokens: paired on the prompt ids when both sides
    hold the same ones, each once; unpaired otherwise."""
    ids_a, ids_b = [p for _, p in a.units], [p for _, p in b.units]
    paired = len(set(ids_a)) == len(ids_a) and sorted(ids_a) == sorted(ids_b)
    if paired:
        position = {p: i for i, p in enumerate(ids_b)}
        sb = b.select(rows_b, n_cols, [position[p] for p in ids_a])
    else:
        sb = b.select(rows_b, n_cols)
    return intervals.bootstrap_difference(
        a.select(rows_a, n_cols), sb, paired=paired, statistic=spec.aggregate, **_settings(spec)
    )


class Groups:
    """The bootstrap of one model and probe's prompt groups (`names`, resampled each within
    itself, stream k for the k-th by name) over all their stored layers and tokens, made once;
    `interval` then gives any comparison of them."""

    def __init__(self, cells: PromptCells, names, spec: ReportSpec):
        self.names = sorted(names)
        self.settings = _settings(spec)
        self.statistic = spec.aggregate
        self.layers = cells.layers
        width = cells.sample.sums.shape[2]
        positions = np.asarray(cells.groups, dtype=object)
        samples = [cells.select(self.layers, width, np.flatnonzero(positions == name)) for name in self.names]
        reps = intervals.replicates_by_stratum(
            samples, self.settings["seed"], self.settings["resamples"], self.statistic
        )  # each (resamples, len(layers), width)
        self.sides = {name: (s.n, s.reached(), r) for name, s, r in zip(self.names, samples, reps)}

    def interval(self, x: str, y: str | None, layers, n_cols: int) -> Interval:
        """Group x - group y (None: the mean of the other groups) on the rows `layers` (layer
        numbers; one not stored has no interval) and the first n_cols tokens."""
        others = [name for name in self.names if name != x] if y is None else [y]
        n_x, reached_x, reps_x = self._on(x, layers, n_cols)
        sides = [self._on(name, layers, n_cols) for name in others]
        reps_y = intervals.nanmean(np.stack([r for _, _, r in sides]), axis=0) if y is None else sides[0][2]
        reached_y = sum(reached for _, reached, _ in sides)
        return intervals.interval(
            reps_x,
            reps_y,
            (reached_x >= MIN_PROMPTS) & (reached_y >= MIN_PROMPTS),
            paired=False,
            n_a=n_x,
            n_b=sum(n for n, _, _ in sides),
            statistic=self.statistic,
            **self.settings,
        )

    def _on(self, name: str, layers, n_cols: int):
        """(prompts, reached, replicates) of a group on these rows and columns (a row or column
        it does not have: reached 0, replicates NaN)."""
        n, reached, reps = self.sides[name]
        index = {layer: i for i, layer in enumerate(self.layers)}
        out_reached = np.zeros((len(layers), n_cols))
        out_reps = np.full((reps.shape[0], len(layers), n_cols), np.nan)
        width = min(n_cols, reps.shape[2])
        for row, layer in enumerate(layers):
            if layer in index:
                out_reached[row, :width] = reached[index[layer], :width]
                out_reps[:, row, :width] = reps[:, index[layer], :width]
        return n, out_reached, out_reps


class Cells:
    """`fetch`, once per (model, probe), for the comparisons of one report."""

    def __init__(self, con, where, divergence: str):
        self.con, self.where, self.divergence = con, where, divergence
        self.cache: dict = {}

    def __call__(self, model: str, probe: str) -> PromptCells:
        if (model, probe) not in self.cache:
            self.cache[(model, probe)] = fetch(self.con, self.where, self.divergence, model, probe)
        return self.cache[(model, probe)]
