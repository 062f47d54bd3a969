"""Where several prompts share a cell's largest value (every prompt's KL is exactly 0 at the last
logit-lens layer), the hover's "largest value at" names the largest (model, run, prompt) among
them, on any DuckDB thread count, so a rebuild of a report is the same page (an `arg_max` over the
value alone returned whichever tied row a thread met first)."""

from __future__ import annotations

import duckdb
import pytest
from layer_stores import build_store

from klstore.report import aggregate
from klstore.spec import parse_report_spec
from klstore.store import views


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    return build_store(str(tmp_path_factory.mktemp("ties") / "store"))


@pytest.mark.parametrize("threads", [1, 4])
def test_the_largest_value_names_the_same_prompt_on_ties(store_uri, threads, monkeypatch):
    spec = parse_report_spec({"name": "t", "group_by": ["model"], "runs": "all"})
    connect = duckdb.connect  # views.connect locks its configuration: set the threads as it connects
    monkeypatch.setattr(duckdb, "connect", lambda *a, config=None: connect(*a, config={**config, "threads": threads}))
    con = views.connect(store_uri)
    assert con.execute("SELECT current_setting('threads')").fetchone()[0] == threads
    monkeypatch.undo()
    where, _ = aggregate.filters(con, spec)
    grids = [
        g for g in aggregate.collect(con, spec, where, aggregate.layer_counts(con, where)) if g.kind == "aggregate"
    ]
    raw = duckdb.connect()
    raw.execute(
        f"CREATE VIEW raw AS SELECT * FROM read_parquet('{store_uri}/kl/**/*.parquet', hive_partitioning = true)"
    )
    tied = 0
    for grid in grids:
        model = grid.labels["model"]
        for r, layer in enumerate(grid.layers):
            for c in range(len(grid.columns)):
                holders = raw.execute(
                    "SELECT model, run_id, prompt_id FROM raw WHERE model = ? AND layer = ? AND gen_idx = ? "
                    "AND kl = (SELECT max(kl) FROM raw WHERE model = ? AND layer = ? AND gen_idx = ?) "
                    "ORDER BY model DESC, run_id DESC, prompt_id DESC",
                    [model, layer, c, model, layer, c],
                ).fetchall()
                if not holders:
                    continue
                tied += len(holders) > 1
                at = grid.hover["max_at"][r, c]
                assert (at["model"], at["run_id"], at["prompt_id"]) == holders[0], (model, layer, c)
    assert tied >= 10  # the check met ties (the last layer's exact zeros), not only unique maxima
