"""The store's `settling` view -> what each figure says about settling depth.

A token's settling layer (docs/conventions.md) is the shallowest layer from which the top-1
token of Q stays the generated token through the last layer; null when the last layer's
top-1 is another token ("never settles"). The report reads the view once, for the spec's
selection, into a temporary table on its own connection, then summarises it per figure:
the median settling layer over the tokens that settle, the median depth fraction
((layer + 1) / n_layers), and how many never settle.
"""

from __future__ import annotations

from klstore.report.aggregate import Filter
from klstore.report.grid import Grid

TABLE = "klstore_report_settling"  # a TEMP table on the report's connection only


def load(con, selection: Filter) -> None:
    """Materialise the `settling` rows of the selection (runs, models, probes, groups)."""
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {TABLE} AS SELECT * FROM settling WHERE {selection.sql}", selection.params
    )


def summary(con, where: Filter) -> dict | None:
    """{n_tokens, n_settled, median_layer, median_fraction, n_layers} over the rows of `where`;
    n_layers is None when they mix models of different depths (then only the fraction is told)."""
    row = con.execute(
        f"SELECT count(*), count(settle_layer), median(settle_layer), median(settle_fraction), "
        f"max(n_layers), count(DISTINCT n_layers) FROM {TABLE} WHERE {where.sql}",
        where.params,
    ).fetchone()
    n_tokens, n_settled, layer, fraction, n_layers, depths = row
    if not n_tokens:
        return None
    return {
        "n_tokens": n_tokens,
        "n_settled": n_settled,
        "median_layer": layer,
        "median_fraction": fraction,
        "n_layers": n_layers if depths == 1 else None,
    }


def _labels_filter(labels: dict, exclude_group: str | None = None) -> Filter:
    where = Filter()
    for i, (column, value) in enumerate(sorted(labels.items())):
        where = where.and_(f"{column} = $label_{i}", **{f"label_{i}": value})  # columns: REPORT_DIMENSIONS
    if exclude_group is not None:
        where = where.and_("prompt_group <> $other", other=exclude_group)
    return where


def attach(con, grids: list[Grid]) -> list[Grid]:
    """The grids, each aggregate and difference grid with its settling summary (a new Grid;
    per-prompt grids carry their own and come back as they are)."""
    return [_with_settling(con, grid) for grid in grids]


def _with_settling(con, grid: Grid) -> Grid:
    labels = {k: v for k, v in grid.labels.items() if k in ("model", "probe", "prompt_group")}
    if grid.kind == "aggregate":
        return grid.with_settling(summary(con, _labels_filter(labels)))
    if grid.kind == "difference" and "model" in grid.labels:  # group a vs group b (or the rest)
        a, b = grid.labels["a"], grid.labels["b"]
        other = (
            _labels_filter(labels, exclude_group=a)
            if b == "the other groups"
            else _labels_filter({**labels, "prompt_group": b})
        )
        return grid.with_settling(
            {"a": summary(con, _labels_filter({**labels, "prompt_group": a})), "b": summary(con, other)}
        )
    if grid.kind == "difference":  # model a vs model b
        return grid.with_settling(
            {side: summary(con, _labels_filter({**labels, "model": grid.labels[side]})) for side in ("a", "b")}
        )
    return grid


def per_prompt(con, model: str, probe: str) -> dict:
    """(run_id, prompt_id) -> (settle layer or None per gen_idx, n_layers) for one model and probe."""
    rows = con.execute(
        f"SELECT run_id, prompt_id, list(settle_layer ORDER BY gen_idx), max(n_layers) FROM {TABLE} "
        "WHERE model = $model AND probe = $probe GROUP BY ALL",
        {"model": model, "probe": probe},
    ).fetchall()
    return {(run, prompt): (layers, n_layers) for run, prompt, layers, n_layers in rows}
