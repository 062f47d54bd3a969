"""Store rows -> grids: the SQL aggregates a report draws (KL is never recomputed).

Each figure's numbers come back as an immutable klstore.report.grid.Grid; nothing here knows
how a grid is scaled, observed or drawn.

`filters` turns the spec's selection (runs, models, probes, groups) into a
`Filter`, SQL text with `$name` placeholders and the values that fill them.
`collect` then asks the store's views for every grid the spec wants: one per
grouping key (mean or median over prompts of the non-null values; non-finite
values are stored as null and never averaged in), model-vs-model and
group-vs-group differences (per-prompt grids: klstore.report.prompts). For the interactive
hover each aggregate cell also carries its mean, median, largest value and the prompt that
holds it.

Every value reaches DuckDB as a parameter. Only identifiers are formatted into
the SQL text, and only from klstore.spec's fixed whitelists: the divergence
column (spec.REPORT_VALUES: a divergence or q_entropy), the aggregate function (mean -> avg, median) and the
group_by dimensions (REPORT_DIMENSIONS).
This module never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from klstore.errors import KlstoreError
from klstore.report import compare
from klstore.report.grid import Grid, slug
from klstore.spec import STORED_LAYERS, ReportSpec, parse_layers

DIM_TITLES = {"model": "model", "probe": "probe", "prompt_group": "group"}
EPOCH = "TIMESTAMPTZ '1970-01-01 00:00:00+00'"  # runs missing from the runs table count as oldest


@dataclass(frozen=True)
class Filter:
    """A WHERE condition: `sql` with `$name` placeholders, `params` the values for exactly those names."""

    sql: str = "true"
    params: dict = field(default_factory=dict)

    def and_(self, sql: str, **params) -> Filter:
        clash = set(params) & set(self.params)
        if clash:
            raise ValueError(f"parameter {sorted(clash)[0]!r} is already used by this filter")
        return Filter(f"{self.sql} AND {sql}", {**self.params, **params})

    def and_in(self, column: str, name: str, values) -> Filter:
        """`column IN ($name_0, $name_1, ...)`: one placeholder per value, so DuckDB plans it as it
        would a literal list (and prunes partition folders by it)."""
        params = {f"{name}_{i}": value for i, value in enumerate(values)}
        if not params:
            return self.and_("false")
        return self.and_(f"{column} IN ({', '.join('$' + key for key in params)})", **params)


# ------------------------------------------------------------------ filters
def filters(con, spec: ReportSpec) -> tuple[Filter, dict]:
    """The filter for the spec's values (its selection, and the divergence not null) and what it
    chose: {'runs': [...]} where it picks runs, and 'selection', the same filter without the
    divergence condition (for views without that column, such as `settling`).
    Unknown names are errors that list what exists."""

    def existing(column):  # column: run_id, model, probe or prompt_group (a fixed name)
        return sorted(str(r[0]) for r in con.execute(f"SELECT DISTINCT {column} FROM kl").fetchall())

    if not con.execute("SELECT count(*) FROM kl").fetchone()[0]:
        raise KlstoreError("the store is empty: no kl rows to report on (run `klstore run` first)")
    where = Filter()
    chosen: dict = {}
    if spec.runs == "latest":  # each model's newest run (by the runs table)
        latest = con.execute(f"""
            SELECT model, arg_max(run_id, {{'t': coalesce(r.created_at, {EPOCH}), 'r': run_id}})
            FROM (SELECT DISTINCT model, run_id FROM kl) LEFT JOIN runs r USING (run_id)
            GROUP BY model ORDER BY model""").fetchall()
        # one (model AND run_id) pair of placeholders per model: an OR that prunes partition folders
        pairs = " OR ".join(f"(model = $latest_model_{i} AND run_id = $latest_run_{i})" for i in range(len(latest)))
        where = where.and_(
            f"({pairs})",
            **{f"latest_model_{i}": m for i, (m, _) in enumerate(latest)},
            **{f"latest_run_{i}": r for i, (_, r) in enumerate(latest)},
        )
        chosen["runs"] = sorted({r for _, r in latest})
    elif spec.runs:
        ids = existing("run_id")
        names = dict(con.execute("SELECT run_id, name FROM runs").fetchall())
        picked = [r for r in ids if r in spec.runs or names.get(r) in spec.runs]
        missing = [r for r in spec.runs if r not in ids and r not in names.values()]
        if missing:
            raise KlstoreError(f"run {missing[0]!r} is not in the store; runs: {', '.join(ids)}")
        where = where.and_in("run_id", "run", picked)
        chosen["runs"] = picked
    for key, column in (("models", "model"), ("probes", "probe"), ("groups", "prompt_group")):
        wanted = getattr(spec, key)
        if wanted:
            have = existing(column)
            missing = [w for w in wanted if w not in have]
            if missing:
                raise KlstoreError(
                    f"{column.replace('prompt_', '')} {missing[0]!r} is not in the store; {key}: {', '.join(have)}"
                )
            where = where.and_in(column, column, wanted)
    chosen["selection"] = where
    where = where.and_(f"{spec.divergence} IS NOT NULL")  # divergence: a REPORT_VALUES name
    if not con.execute(f"SELECT count(*) FROM kl WHERE {where.sql}", where.params).fetchone()[0]:
        chose = (
            "; ".join(
                f"{key}: {', '.join(map(str, getattr(spec, key)))}"
                for key in ("models", "probes", "groups")
                if getattr(spec, key)
            )
            or "all models, probes and groups"
        )
        raise KlstoreError(
            f"the report spec matches no {spec.divergence} values in the store "
            f"({chose}; runs: {', '.join(chosen.get('runs', [])) or spec.runs or 'all'})"
        )
    return where, chosen


# ------------------------------------------------------------------ collect
def layers_for(spec: ReportSpec, model: str, n_layers: int, stored=()) -> tuple[int, ...]:
    """The rows of a map of `model`: its layer spec resolved against its depth, or for `stored`
    the layers in `stored` (those present in the rows the map draws, in any order)."""
    if spec.layers_for(model) == STORED_LAYERS:
        return tuple(sorted({int(layer) for layer in stored}))
    return parse_layers(spec.layers_for(model), n_layers, model)


def _grid_from_rows(rows, layers, n_cols):
    """(values, counts), each (len(layers), n_cols), from rows of (layer, gen_idx, value, count)."""
    values, counts = arrays_from_rows(rows, layers, n_cols, (np.nan, 0))
    return values, counts.astype(int)


def arrays_from_rows(rows, layers, n_cols, fills):
    """One (len(layers), n_cols) array per field after (layer, gen_idx) in `rows`; `fills`
    gives each array's value where a cell has no row (NaN for numbers, None for objects)."""
    index = {layer: i for i, layer in enumerate(layers)}
    arrays = [
        np.full((len(layers), n_cols), fill, dtype=float if isinstance(fill, (int, float)) else object)
        for fill in fills
    ]
    for layer, gen_idx, *fields in rows:
        if layer in index and gen_idx < n_cols:
            for array, value in zip(arrays, fields):
                array[index[layer], gen_idx] = np.nan if value is None and array.dtype == float else value
    return arrays


def _sql_aggregate(spec: ReportSpec) -> str:
    return "avg" if spec.aggregate == "mean" else "median"  # aggregate: "mean" | "median" (validated)


def layer_counts(con, where: Filter) -> dict:
    """model -> its number of layers (the largest stored n_layers, else its deepest layer + 1)."""
    n_layers = dict(
        con.execute(f"SELECT model, max(n_layers) FROM kl WHERE {where.sql} GROUP BY model", where.params).fetchall()
    )
    for model, count in list(n_layers.items()):
        if count is None:  # files from before n_layers was stored
            n_layers[model] = con.execute(
                "SELECT max(layer) + 1 FROM kl WHERE model = $model", {"model": model}
            ).fetchone()[0]
    return n_layers


def collect(con, spec: ReportSpec, where: Filter, n_layers: dict | None = None) -> list[Grid]:
    """Every aggregate and difference grid the spec asks for, straight from the store's views
    (`where` from filters; per-prompt grids come from klstore.report.prompts)."""
    n_layers = n_layers or layer_counts(con, where)
    grids: list[Grid] = []
    overall: dict = {}
    by_group: dict = {}
    for grouping in spec.group_by:
        for grid in _aggregates(con, spec, where, grouping, n_layers):
            grids.append(grid)
            if set(grouping) >= {"model", "probe"}:
                target = by_group if "prompt_group" in grouping else overall
                target[tuple(grid.labels[d] for d in grouping)] = grid
    cells = compare.Cells(con, where, spec.divergence)  # per-prompt cells, read once per (model, probe)
    if spec.compare_models:
        grids += _model_comparisons(con, spec, where, n_layers, cells)
    if spec.compare_groups:
        grids += _group_comparisons(by_group, spec, cells)
    return grids


def _aggregates(con, spec: ReportSpec, where: Filter, grouping, n_layers) -> list[Grid]:
    """One grid per combination of the grouping's dimensions: the spec's aggregate per cell, and
    for the hover the mean, median, largest value and the (model, run, prompt) that holds it."""
    div = spec.divergence
    dims = ", ".join(grouping)  # names from REPORT_DIMENSIONS (validated)
    cells = con.execute(
        f"SELECT {dims}, layer, gen_idx, avg({div}), median({div}), count({div}), max({div}), "
        # the cell's largest value and who holds it; ties (e.g. exact zeros at the last layer) go
        # to the largest (model, run, prompt), so a rebuild names the same prompt on any thread count
        f"arg_max({{'model': model, 'run_id': run_id, 'prompt_id': prompt_id}}, "
        f"{{'v': {div}, 'm': model, 'r': run_id, 'p': prompt_id}}) FILTER (WHERE {div} IS NOT NULL) "
        f"FROM kl WHERE {where.sql} GROUP BY {dims}, layer, gen_idx ORDER BY {dims}, layer, gen_idx",
        where.params,
    ).fetchall()
    prompts = {
        tuple(r[:-1]): r[-1]
        for r in con.execute(
            f"SELECT {dims}, count(DISTINCT prompt_id) FROM kl WHERE {where.sql} GROUP BY ALL", where.params
        ).fetchall()
    }
    figures: dict = {}
    for row in cells:
        figures.setdefault(tuple(row[: len(grouping)]), []).append(row[len(grouping) :])
    section = "by " + ", ".join(DIM_TITLES[d] for d in grouping)
    out = []
    for key, rows in figures.items():
        labels = dict(zip(grouping, key))
        model = labels.get("model")
        stored = tuple(sorted({r[0] for r in rows}))  # rows: only cells with a value
        layers = layers_for(spec, model, n_layers[model], stored) if model else stored
        n_cols = max(r[1] for r in rows) + 1
        mean, median, counts, top, top_at = arrays_from_rows(rows, layers, n_cols, (np.nan, np.nan, 0, np.nan, None))
        title = " | ".join(f"{labels[d]}" for d in grouping) + f" | {spec.aggregate} of {prompts[key]} prompts"
        out.append(
            Grid(
                slug("agg", *grouping, *key),
                section,
                title,
                layers,
                tuple(f"Gen{i}" for i in range(n_cols)),
                mean if spec.aggregate == "mean" else median,
                counts.astype(int),
                prompts[key],
                div,
                "aggregate",
                labels,
                inputs=_inputs_for(labels, n_layers),
                hover={"aggregate": spec.aggregate, "mean": mean, "median": median, "max": top, "max_at": top_at},
            )
        )
    return out


def _inputs_for(labels: dict, n_layers: dict) -> tuple:
    models = [labels["model"]] if "model" in labels else sorted(n_layers)
    return tuple((m, labels.get("probe")) for m in models)


def _full_grid(con, spec, where: Filter, model, probe, n_layers):
    """All layers of one model and probe: (values, counts), each (n_layers, n_tokens)."""
    one = where.and_("model = $model AND probe = $probe", model=model, probe=probe)
    rows = con.execute(
        f"SELECT layer, gen_idx, {_sql_aggregate(spec)}({spec.divergence}), "
        f"count({spec.divergence}) FROM kl WHERE {one.sql} GROUP BY ALL",
        one.params,
    ).fetchall()
    n_cols = max(r[1] for r in rows) + 1
    return _grid_from_rows(rows, tuple(range(n_layers)), n_cols)


def _model_comparisons(con, spec, where: Filter, n_layers, cells=None) -> list[Grid]:
    """A - B for each probe and pair of models; by relative depth when layer counts differ; with
    each cell's bootstrap interval (`cells`: a compare.Cells of this filter)."""
    out = []
    cells = cells or compare.Cells(con, where, spec.divergence)
    pairs = con.execute(
        f"SELECT probe, list(DISTINCT model ORDER BY model) FROM kl WHERE {where.sql} GROUP BY probe ORDER BY probe",
        where.params,
    ).fetchall()
    for probe, models in pairs:
        for i in range(len(models)):
            for j in range(i + 1, len(models)):
                a, b = models[i], models[j]
                va, ca = _full_grid(con, spec, where, a, probe, n_layers[a])
                vb, cb = _full_grid(con, spec, where, b, probe, n_layers[b])
                n_cols = min(va.shape[1], vb.shape[1])
                gaps = None
                if n_layers[a] == n_layers[b]:  # `stored`: the layers stored on both sides
                    both = [k for k in range(n_layers[a]) if ca[k].any() and cb[k].any()]
                    layers = layers_for(spec, a, n_layers[a], both)
                    rows_a = rows_b = list(layers)
                    ylabel, shown = "Layer", layers
                else:  # relative depth: the shallower model's layers, the deeper one's nearest
                    small, big = (a, b) if n_layers[a] < n_layers[b] else (b, a)
                    m, n = n_layers[small], n_layers[big]
                    mapped = [round(k * (n - 1) / max(m - 1, 1)) for k in range(m)]
                    ks = list(range(m))
                    if STORED_LAYERS in (spec.layers_for(a), spec.layers_for(b)):  # rows stored on both sides
                        c_small, c_big = (ca, cb) if a == small else (cb, ca)
                        ks = [k for k in ks if c_small[k].any() and c_big[mapped[k]].any()]
                        gaps = tuple(i for i in range(len(ks) - 1) if ks[i + 1] > ks[i] + 1)
                    rows_a = ks if a == small else [mapped[k] for k in ks]
                    rows_b = ks if b == small else [mapped[k] for k in ks]
                    shown = tuple(round(k / max(m - 1, 1), 2) for k in ks)
                    ylabel = f"Relative depth ({small} layer k, {big} layer {n - 1}k/{m - 1})"
                if not rows_a:  # no layer stored on both sides: nothing to subtract
                    continue
                values = va[rows_a, :n_cols] - vb[rows_b, :n_cols]
                counts = np.minimum(ca[rows_a, :n_cols], cb[rows_b, :n_cols])
                title = f"{a} minus {b} | {probe} | {spec.aggregate}"
                out.append(
                    Grid(
                        slug("cmp-models", probe, a, b),
                        "model comparisons",
                        title,
                        tuple(shown),
                        tuple(f"Gen{c}" for c in range(n_cols)),
                        values,
                        counts,
                        int(counts.max()) if counts.size else 0,
                        spec.divergence,
                        "difference",
                        {"probe": probe, "a": a, "b": b},
                        inputs=((a, probe), (b, probe)),
                        ylabel=ylabel,
                        hover={"a": va[rows_a, :n_cols], "b": vb[rows_b, :n_cols]},
                        gaps=gaps,
                        interval=compare.models(cells(a, probe), cells(b, probe), rows_a, rows_b, n_cols, spec),
                    )
                )
    return out


def _group_comparisons(by_group: dict, spec: ReportSpec | None = None, cells=None) -> list[Grid]:
    """Group A - group B per model and probe: all pairs up to 4 groups, else each vs the rest's mean;
    with each cell's bootstrap interval when given the spec and a compare.Cells."""
    out = []
    per: dict = {}
    for grid in by_group.values():
        per.setdefault((grid.labels["model"], grid.labels["probe"]), []).append(grid)
    for (model, probe), grids in sorted(per.items()):
        grids = sorted(grids, key=lambda g: g.labels["prompt_group"])
        if len(grids) < 2:
            continue
        pairs = (
            [(x, y) for i, x in enumerate(grids) for y in grids[i + 1 :]]
            if len(grids) <= 4
            else [(x, None) for x in grids]
        )
        names = [g.labels["prompt_group"] for g in grids]
        boot = None if cells is None or spec is None else compare.Groups(cells(model, probe), names, spec)
        for x, y in pairs:
            n_cols = x.values.shape[1] if y is None else min(x.values.shape[1], y.values.shape[1])
            # the rows both sides have (groups of a `stored` report may hold different layers)
            sides = [g for g in grids if g is not x] if y is None else [y]
            layers = tuple(k for k in x.layers if any(k in g.layers for g in sides))
            if not layers:
                continue
            mine = _on_rows(x.values, x.layers, layers, n_cols)
            if y is None:
                rest = [_on_rows(g.values, g.layers, layers, n_cols) for g in sides]
                other, other_name = nan_mean(np.stack(rest), axis=0), "the other groups"
                counts = _on_rows(x.counts, x.layers, layers, n_cols, 0).astype(int)
            else:
                other, other_name = _on_rows(y.values, y.layers, layers, n_cols), y.labels["prompt_group"]
                counts = np.minimum(
                    _on_rows(x.counts, x.layers, layers, n_cols, 0), _on_rows(y.counts, y.layers, layers, n_cols, 0)
                ).astype(int)
            name = x.labels["prompt_group"]
            out.append(
                Grid(
                    slug("cmp-groups", model, probe, name, other_name),
                    "group comparisons",
                    f"{model} | {probe} | {name} minus {other_name}",
                    layers,
                    tuple(f"Gen{c}" for c in range(n_cols)),
                    mine - other,
                    counts,
                    int(counts.max()) if counts.size else 0,
                    x.divergence,
                    "difference",
                    {"model": model, "probe": probe, "a": name, "b": other_name},
                    inputs=((model, probe),),
                    hover={"a": mine, "b": other},
                    interval=boot.interval(name, None if y is None else other_name, layers, n_cols) if boot else None,
                )
            )
    return out


def _on_rows(array, have, layers, n_cols: int, fill=np.nan) -> np.ndarray:
    """`array` (rows for the layers `have`) on the rows `layers` and its first n_cols columns;
    `fill` where it has no such row or column."""
    out = np.full((len(layers), n_cols), fill, dtype=float)
    index = {layer: i for i, layer in enumerate(have)}
    width = min(n_cols, array.shape[1])
    for r, layer in enumerate(layers):
        if layer in index:
            out[r, :width] = array[index[layer], :width]
    return out


def nan_mean(values, axis: int) -> np.ndarray:
    """numpy's nanmean (the same sums, divided by the same counts) with NaN, and no
    "Mean of empty slice" warning, where a slice has no value."""
    values = np.asarray(values, dtype=np.float64)
    present = ~np.isnan(values)
    total = np.where(present, values, 0.0).sum(axis=axis)
    count = present.sum(axis=axis)
    return np.divide(total, count, out=np.full(np.shape(total), np.nan), where=count > 0)


def summary(con, spec: ReportSpec, where: Filter):
    """The summary table: (column names, rows of model, probe, prompts, cells, mean, top-1 agreement)."""
    names = ["model", "probe", "prompts", "cells", f"mean {spec.divergence}", "top-1 agreement"]
    rows = con.execute(
        f"SELECT model, probe, count(DISTINCT prompt_id), count(*), avg({spec.divergence}), "
        f"avg(top1_match::INT) FROM kl WHERE {where.sql} GROUP BY ALL ORDER BY ALL",
        where.params,
    ).fetchall()
    return names, rows
