"""Lens tokens in the store, and the settling views and macros against plain Python."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from store_helpers import JOB, PROMPTS, tiny_worker
from tiny_models import VOCAB, ToyTokenizer, build

from klstore.core.engine import Engine
from klstore.core.models import from_objects
from klstore.errors import KlstoreError
from klstore.store import views

CELL_KEY = ("run_id", "model", "probe", "prompt_id", "gen_idx")


@pytest.fixture(scope="module")
def tiny():
    return from_objects("tiny", build("llama"), ToyTokenizer())


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("lens") / "store")
    worker = tiny_worker(tiny, uri)
    worker.run_shard("r1", PROMPTS[:3], JOB)
    worker.run_shard("r1", PROMPTS[3:], JOB)
    return uri


def _rows(uri, query, params=None):
    names, rows = views.sql(uri, query, params)
    return [dict(zip(names, row)) for row in rows]


def test_lens_columns_round_trip(tiny, store):
    in_memory = Engine(tiny).run_many(PROMPTS[:3], list(JOB.probes), "all", ("kl", "js"), JOB.generation)
    for prompt, matrices in zip(PROMPTS[:3], in_memory):
        for m in matrices:
            rows = _rows(
                store,
                "SELECT topk_ids, topk_probs, gen_rank, gen_logq FROM kl WHERE prompt_id = ? "
                "AND probe = ? ORDER BY layer, gen_idx",
                [prompt.id, m.probe],
            )
            shape = m.topk_ids.shape
            assert np.array([r["topk_ids"] for r in rows]).reshape(shape).tolist() == m.topk_ids.tolist()
            np.testing.assert_array_equal(
                np.array([r["topk_probs"] for r in rows], np.float32).reshape(shape), m.topk_probs
            )
            assert [r["gen_rank"] for r in rows] == m.gen_rank.reshape(-1).tolist()
            np.testing.assert_array_equal(np.array([r["gen_logq"] for r in rows], np.float32), m.gen_logq.reshape(-1))


def test_lens_tokens_view_one_row_per_cell_and_rank(store):
    cells = _rows(store, "SELECT count(*) AS n FROM kl")[0]["n"]
    rows = _rows(store, "SELECT * FROM lens_tokens ORDER BY run_id, model, probe, prompt_id, layer, gen_idx, rank")
    assert len(rows) == cells * 5
    first = _rows(
        store, "SELECT topk_ids, topk_probs FROM kl ORDER BY run_id, model, probe, prompt_id, layer, gen_idx LIMIT 1"
    )[0]
    assert [r["rank"] for r in rows[:5]] == [1, 2, 3, 4, 5]
    assert [r["token_id"] for r in rows[:5]] == first["topk_ids"]
    assert [r["prob"] for r in rows[:5]] == first["topk_probs"]
    tokenizer = ToyTokenizer()
    assert all(r["token_text"] == tokenizer.decode([r["token_id"]]) for r in rows)
    # the vocabulary is stored once per model, however many shards wrote rows
    assert _rows(store, "SELECT count(*) AS n, count(DISTINCT token_id) AS d FROM tokens")[0] == {
        "n": VOCAB,
        "d": VOCAB,
    }


def test_topk_zero_writes_no_token_rows(tiny, tmp_path):
    uri = str(tmp_path / "store")
    tiny_worker(tiny, uri).run_shard("r1", PROMPTS[:2], JOB.model_copy(update={"topk": 0}))
    assert _rows(uri, "SELECT count(*) AS n FROM lens_tokens")[0]["n"] == 0
    assert _rows(uri, "SELECT count(*) AS n FROM tokens")[0]["n"] == 0
    assert not list((tmp_path / "store").glob("tokens/**/*.parquet"))
    row = _rows(uri, "SELECT count(*) AS n, count(topk_ids) AS k, count(gen_rank) AS r FROM kl")[0]
    assert row["n"] > 0 and row["k"] == 0 and row["r"] == row["n"]  # ranks are kept


def _old_file(folder, rows):
    """A kl file as written before lens tokens existed (no topk/gen columns, no n_layers)."""
    folder.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "prompt_id": [r[0] for r in rows],
                "prompt_group": ["g"] * len(rows),
                "layer": pa.array([r[1] for r in rows], pa.int16()),
                "gen_idx": pa.array([r[2] for r in rows], pa.int16()),
                "kl": pa.array([r[3] for r in rows], pa.float32()),
                "top1_match": [r[4] for r in rows],
                "n_layers": pa.array([4] * len(rows), pa.int16()),
            }
        ),
        folder / "part-old.parquet",
    )


def test_old_store_without_lens_columns_still_queries(tmp_path):
    uri = tmp_path / "store"
    _old_file(
        uri / "kl" / "model=old" / "probe=logit_lens" / "run_id=r0",
        [("x", layer, 0, 1.0 - layer / 4, layer >= 2) for layer in range(4)],
    )
    rows = _rows(str(uri), "SELECT kl, topk_ids, topk_probs, gen_rank, gen_logq, q_entropy FROM kl ORDER BY layer")
    assert rows[0] == {
        "kl": 1.0,
        "topk_ids": None,
        "topk_probs": None,
        "gen_rank": None,
        "gen_logq": None,
        "q_entropy": None,  # written before the entropy of Q existed
    }
    assert _rows(str(uri), "SELECT count(*) AS n FROM lens_tokens")[0]["n"] == 0
    assert _rows(str(uri), "SELECT settle_layer FROM settling") == [{"settle_layer": 2}]
    statements = "\n".join(views.view_statements(views.open_store(str(uri))).values())
    import duckdb

    con = duckdb.connect()
    con.execute(statements)
    assert con.execute("SELECT settle_layer FROM settling").fetchall() == [(2,)]


# ------------------------------------------------------------ settling: plain Python
def _settle(flags_by_layer: dict[int, bool]) -> int | None:
    """Shallowest stored layer from which every deeper stored layer is good; None if the deepest is bad."""
    settle = None
    for layer in sorted(flags_by_layer, reverse=True):
        if not flags_by_layer[layer]:
            break
        settle = layer
    return settle


def _columns(uri, value_sql: str) -> dict:
    """{cell key: {layer: good}} from the kl view, `value_sql` giving each row's 'good' flag."""
    out: dict = {}
    for r in _rows(uri, f"SELECT {', '.join(CELL_KEY)}, layer, {value_sql} AS good FROM kl"):
        out.setdefault(tuple(r[c] for c in CELL_KEY), {})[r["layer"]] = bool(r["good"])
    return out


def _settling_rows(uri, source: str, params=None) -> dict:
    return {
        tuple(r[c] for c in CELL_KEY): (r["settle_layer"], r["settle_fraction"], r["n_layers"])
        for r in _rows(uri, f"SELECT * FROM {source}", params)
    }


def test_settling_view_matches_python(store):
    expected = {key: _settle(flags) for key, flags in _columns(store, "top1_match").items()}
    got = _settling_rows(store, "settling")
    assert {k: v[0] for k, v in got.items()} == expected
    assert {v for v in expected.values() if v is not None} - {0}, "every token settled at layer 0: weak test"
    for layer, fraction, n_layers in got.values():
        assert fraction == (None if layer is None else (layer + 1) / n_layers)


@pytest.mark.parametrize("metric, g", [("kl", 0.05), ("kl", 0.5), ("js", 0.02), ("js", 0.2)])
def test_settling_depth_macro_matches_python(store, metric, g):
    flags = _columns(store, f"coalesce({metric} <= {g}, false)")
    expected = {key: _settle(f) for key, f in flags.items()}
    got = _settling_rows(store, f"settling_depth(?, metric := '{metric}')", [g])
    assert {k: v[0] for k, v in got.items()} == expected
    assert len(set(expected.values())) > 1, "every token settled at the same layer: weak test"


@pytest.mark.parametrize("g, rho", [(0.05, 0.5), (0.2, 0.7), (0.02, 0.25)])
def test_deep_thinking_matches_python(store, g, rho):
    flags = _columns(store, f"coalesce(js <= {g}, false)")
    n_layers = 4
    per_prompt: dict = {}
    for key, f in flags.items():
        settle = _settle(f)
        deep = settle is None or (settle + 1) / n_layers > rho
        counts = per_prompt.setdefault(key[:4], [0, 0])
        counts[0] += 1
        counts[1] += deep
    got = {
        tuple(r[c] for c in CELL_KEY[:4]): (r["n_tokens"], r["n_deep"], r["deep_share"])
        for r in _rows(store, "SELECT * FROM deep_thinking(?, ?)", [g, rho])
    }
    assert got == {k: (n, d, d / n) for k, (n, d) in per_prompt.items()}


def test_settling_on_constructed_columns(tmp_path):
    uri = tmp_path / "store"
    # x/Gen0: T F T T -> 2; x/Gen1: F F F T -> 3; x/Gen2: T T T F -> never; x/Gen3: all T -> 0
    pattern = {0: [1, 0, 1, 1], 1: [0, 0, 0, 1], 2: [1, 1, 1, 0], 3: [1, 1, 1, 1]}
    _old_file(
        uri / "kl" / "model=m" / "probe=logit_lens" / "run_id=r0",
        [
            ("x", layer, gen, 0.0 if pattern[gen][layer] else 1.0, bool(pattern[gen][layer]))
            for gen in pattern
            for layer in range(4)
        ],
    )
    got = _rows(str(uri), "SELECT gen_idx, settle_layer, settle_fraction FROM settling ORDER BY gen_idx")
    assert [(r["gen_idx"], r["settle_layer"]) for r in got] == [(0, 2), (1, 3), (2, None), (3, 0)]
    assert [r["settle_fraction"] for r in got] == [0.75, 1.0, None, 0.25]
    by_kl = _rows(str(uri), "SELECT gen_idx, settle_layer FROM settling_depth(0.5) ORDER BY gen_idx")
    assert [r["settle_layer"] for r in by_kl] == [2, 3, None, 0]
    deep = _rows(str(uri), "SELECT n_tokens, n_deep, deep_share FROM deep_thinking(0.5, 0.5, metric := 'kl')")
    assert deep == [{"n_tokens": 4, "n_deep": 3, "deep_share": 0.75}]  # 0.75, 1.0 and never


def test_settling_depth_rejects_an_unknown_metric(store):
    with pytest.raises(KlstoreError, match="metric must be kl, kl_reverse or js"):
        views.sql(store, "SELECT * FROM settling_depth(0.1, metric := 'nats')")


def test_stored_q_entropy_is_the_entropy_of_the_stored_topk_and_the_outputs_at_the_last_layer(store):
    """q_entropy in the store: finite, within [sum over the top-k of -q log q, log |V|] (the top-k
    terms are part of the sum), and at the last layer the generations table's entropy."""
    rows = _rows(store, "SELECT q_entropy, topk_probs FROM kl WHERE probe = 'logit_lens'")
    assert rows and all(r["q_entropy"] is not None for r in rows)
    for r in rows:
        top = np.asarray(r["topk_probs"], np.float64)
        assert float(-(top * np.log(top)).sum()) - 1e-5 <= r["q_entropy"] <= np.log(VOCAB) + 1e-5
    last = _rows(
        store,
        "SELECT k.q_entropy, g.entropy FROM kl k JOIN generations g USING (run_id, model, prompt_id, gen_idx) "
        "WHERE k.probe = 'logit_lens' AND k.layer = k.n_layers - 1",
    )
    assert last and all(r["q_entropy"] == r["entropy"] for r in last)


def test_report_maps_q_entropy_when_the_spec_asks_for_it(store):
    """`value: q_entropy` in a report spec: the aggregate maps are the mean entropy of Q per cell,
    as plain SQL over the view computes it, labelled as the entropy of Q."""
    from klstore.report import aggregate
    from klstore.report.plotting import DIVERGENCE_LABELS
    from klstore.spec import parse_report_spec

    spec = parse_report_spec({"name": "entropy", "value": "q_entropy", "compare_models": False})
    assert spec.divergence == "q_entropy" and DIVERGENCE_LABELS["q_entropy"] == "Entropy of Q (nats)"
    con = views.connect(store)
    where, _ = aggregate.filters(con, spec)
    grids = [
        g for g in aggregate.collect(con, spec, where, aggregate.layer_counts(con, where)) if g.kind == "aggregate"
    ]
    assert grids
    for grid in grids:
        labels = grid.labels
        sql = "SELECT layer, gen_idx, avg(q_entropy) FROM kl WHERE model = ? AND probe = ?"
        params = [labels["model"], labels["probe"]]
        if "prompt_group" in labels:
            sql, params = sql + " AND prompt_group = ?", [*params, labels["prompt_group"]]
        expected = np.full(grid.values.shape, np.nan)
        for layer, gen_idx, value in con.execute(sql + " GROUP BY ALL", params).fetchall():
            expected[grid.layers.index(layer), gen_idx] = value
        assert grid.divergence == "q_entropy"
        np.testing.assert_allclose(grid.values, expected, rtol=1e-12)
    with pytest.raises(KlstoreError, match="value 'q_entropy' and divergence 'kl' disagree"):
        parse_report_spec({"value": "q_entropy", "divergence": "kl"})
