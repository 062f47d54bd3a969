"""Report maps over layer subsets (issue 25): `layers: stored` draws the layers present in the
rows (the union over runs, with per-cell counts), comparisons show the rows stored on both
sides, a jump in the layer numbers gets a break line, and `all` keeps its meaning.
Every expectation is computed again from the Parquet files with plain DuckDB.
(The site, its files and warnings: tests/integration/test_report_layers.py; in a browser:
tests/integration/test_report_layers_browser.py.)"""

from __future__ import annotations

import warnings
from pathlib import Path

import duckdb
import numpy as np
import pytest
from layer_stores import DEPTHS, SEED_LAYERS, UNION_LAYERS, build_store

from klstore.config import load_report_spec
from klstore.errors import KlstoreError
from klstore.report import aggregate, interactive, plotting, prompts, settling, site
from klstore.report.figure import Figure
from klstore.report.grid import Grid
from klstore.report.observe import observe
from klstore.spec import parse_report_spec
from klstore.store import views

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    return build_store(str(tmp_path_factory.mktemp("layers") / "store"))


@pytest.fixture(scope="module")
def raw(store_uri):
    """Plain DuckDB over the kl files, nothing of klstore in between."""
    con = duckdb.connect()
    con.execute(
        f"CREATE VIEW raw AS SELECT * FROM read_parquet('{store_uri}/kl/**/*.parquet', hive_partitioning = true)"
    )
    return con


def _spec(**changes):
    return parse_report_spec({"name": "t", **changes})


def _grids(store_uri, spec):
    """The aggregate and comparison grids, and every per-prompt grid, of the spec."""
    con = views.connect(store_uri)
    where, chosen = aggregate.filters(con, spec)
    n_layers = aggregate.layer_counts(con, where)
    grids = aggregate.collect(con, spec, where, n_layers)
    settling.load(con, chosen["selection"])
    pages = [g for listing in prompts.listings(con) for g in prompts.grids(con, spec, where, n_layers, listing)]
    return grids, pages


def _plain(raw, where: str, layers, n_cols: int, runs=None):
    """(mean, count) of kl per (layer, gen_idx) over the rows `where`, on the rows `layers`."""
    runs_sql = "" if runs is None else f" AND run_id IN ({', '.join(repr(r) for r in runs)})"
    rows = raw.execute(
        f"SELECT layer, gen_idx, avg(kl), count(kl) FROM raw WHERE {where}{runs_sql} GROUP BY ALL"
    ).fetchall()
    mean, count = np.full((len(layers), n_cols), np.nan), np.zeros((len(layers), n_cols), int)
    for layer, gen_idx, value, n in rows:
        if layer in layers:
            mean[layers.index(layer), gen_idx], count[layers.index(layer), gen_idx] = value, n
    return mean, count


def _stored(raw, where: str) -> list[int]:
    return [r[0] for r in raw.execute(f"SELECT DISTINCT layer FROM raw WHERE {where} ORDER BY 1").fetchall()]


# ------------------------------------------------------------------ the spec
def test_stored_is_the_default_of_the_built_in_spec_and_of_default_yaml():
    built_in = load_report_spec(None)
    assert built_in.layers == "stored" and built_in.layers_for("any") == "stored"
    assert load_report_spec(REPO / "reports" / "default.yaml").describe() == built_in.describe()
    assert _spec(layers=" Stored ").layers == "stored"
    mapped = _spec(layers={"deep": "stored", "default": "all"})
    assert mapped.layers_for("deep") == "stored" and mapped.layers_for("other") == "all"
    assert _spec(layers={"deep": "0,15-21,27"}).layers_for("other") == "stored"  # no default: the spec's
    with pytest.raises(KlstoreError, match="layers must be a layer spec such as all or 0,15-21,27, stored"):
        _spec(layers="stord")


def test_layer_gaps():
    assert plotting.layer_gaps(SEED_LAYERS) == (0, 7)  # after 0 and after 21
    assert plotting.layer_gaps(tuple(range(28))) == ()
    assert plotting.layer_gaps((np.int64(3), np.int64(5))) == (0,)
    assert plotting.layer_gaps((0.0, 0.5, 1.0)) == () and plotting.layer_gaps(()) == ()


# ------------------------------------------------------------------ one run
def test_a_subset_store_maps_exactly_the_stored_layers(store_uri, raw):
    grids, pages = _grids(store_uri, _spec(models=["deep"], per_prompt=2))
    assert _stored(raw, "model = 'deep'") == list(SEED_LAYERS)  # what was computed
    aggregates = [g for g in grids if g.kind == "aggregate"]
    assert len(aggregates) == 3 and len(pages) == 4  # overall, groups a and b; one page per prompt
    for grid in aggregates + pages:
        labels = grid.labels
        where = f"model = 'deep' AND probe = '{labels['probe']}'"
        if "prompt_group" in labels:
            where += f" AND prompt_group = '{labels['prompt_group']}'"
        if grid.kind == "prompt":
            where += f" AND prompt_id = '{labels['prompt_id']}'"
        assert grid.layers == SEED_LAYERS, grid.title
        mean, count = _plain(raw, where, list(SEED_LAYERS), grid.values.shape[1])
        np.testing.assert_allclose(grid.values, mean, rtol=1e-12)
        assert (count.sum(axis=1) > 0).all()  # no empty row
        if grid.kind == "aggregate":
            np.testing.assert_array_equal(grid.counts, count)
    diff = next(g for g in grids if g.kind == "difference")  # group a minus group b
    assert diff.layers == SEED_LAYERS and diff.labels["a"] == "a"


def test_the_maps_draw_only_stored_rows_with_a_break_at_each_jump(store_uri):
    grids, pages = _grids(store_uri, _spec(models=["deep"], per_prompt=1))
    for grid in (grids[0], pages[0]):
        fig = plotting.draw(site.heatmap_data(Figure(grid)))
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()] == [str(k) for k in SEED_LAYERS]
        assert ax.images[0].get_array().shape == (len(SEED_LAYERS), grid.values.shape[1])
        breaks = {line.get_gid(): line.get_ydata()[0] for line in ax.lines}
        assert breaks == {"layer-gap-0": 0.5, "layer-gap-7": 7.5}  # between 0|15 and 21|27
        layout = interactive.figure(Figure(grid))["layout"]
        assert layout["yaxis"]["ticktext"] == [str(k) for k in SEED_LAYERS]
        assert [(s["y0"], s["y1"], s["name"]) for s in layout["shapes"]] == [
            (0.5, 0.5, "layer gap 0-15"),
            (7.5, 7.5, "layer gap 21-27"),
        ]


def test_all_keeps_every_layer_of_the_model(store_uri, raw):
    grids, pages = _grids(store_uri, _spec(models=["deep"], layers="all", per_prompt=1))
    for grid in [g for g in grids if g.kind == "aggregate"] + pages:
        assert grid.layers == tuple(range(28))
        stored = np.isin(np.arange(28), SEED_LAYERS)
        assert np.isnan(grid.values[~stored]).all() and np.isfinite(grid.values[stored]).all()
        assert (grid.counts[~stored] == 0).all()
        assert plotting.layer_gaps(grid.layers) == () and "shapes" not in interactive.figure(Figure(grid))["layout"]
    explicit = _grids(store_uri, _spec(models=["deep"], layers="15-17", per_prompt=0))[0]
    assert all(g.layers == (15, 16, 17) for g in explicit)


# ------------------------------------------------------------------ several runs
def test_runs_with_different_subsets_draw_the_union_with_per_cell_counts(store_uri, raw):
    runs = ["u1", "u2"]
    grids, _ = _grids(store_uri, _spec(models=["union"], runs=runs, per_prompt=0))
    by_title = {g.title: g for g in grids}
    overall = by_title["union | logit_lens | mean of 4 prompts"]
    union = tuple(_stored(raw, "model = 'union'"))
    assert union == overall.layers == UNION_LAYERS  # 0, 15-17 from u1; 17, 26-27 from u2
    mean, count = _plain(raw, "model = 'union'", list(union), overall.values.shape[1], runs)
    np.testing.assert_allclose(overall.values, mean, rtol=1e-12)
    np.testing.assert_array_equal(overall.counts, count)
    assert count[union.index(17)].min() > count[union.index(0)].max()  # both runs reach layer 17
    assert plotting.layer_gaps(overall.layers) == (0, 3)
    fig = plotting.draw(site.heatmap_data(Figure(overall)))  # n=<count> where fewer prompts reached a cell
    full = int(count.max())
    expected = [plotting.cell_text(v) + (f"\nn={n}" if n < full else "") for v, n in zip(mean.flat, count.flat)]
    assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(expected)
    assert sum("\nn=" in text for text in expected) == (len(union) - 1) * count.shape[1]  # all but 17
    group_a = by_title["union | logit_lens | a | mean of 2 prompts"]
    group_b = by_title["union | logit_lens | b | mean of 2 prompts"]
    assert group_a.layers == (0, 15, 16, 17) and group_b.layers == (17, 26, 27)
    diff = by_title["union | logit_lens | a minus b"]  # only the layer both groups have
    n_cols = diff.values.shape[1]
    assert diff.layers == (17,)
    np.testing.assert_array_equal(diff.values, group_a.values[-1:, :n_cols] - group_b.values[:1, :n_cols])
    np.testing.assert_array_equal(diff.counts, np.minimum(group_a.counts[-1:, :n_cols], group_b.counts[:1, :n_cols]))


def test_model_comparisons_show_the_rows_stored_on_both_sides(store_uri, raw):
    models = ["deep", "half", "union"]
    spec = _spec(models=models, runs="all", group_by=[["model", "probe"]], per_prompt=0)
    grids, _ = _grids(store_uri, spec)
    by_title = {g.title: g for g in grids}
    agg = {m: by_title[f"{m} | logit_lens | mean of 4 prompts"] for m in models}
    deep, twin, half = (set(_stored(raw, f"model = '{m}'")) for m in ("deep", "union", "half"))
    # same depth: layer by layer, the intersection
    same = by_title["deep minus union | logit_lens | mean"]
    both = tuple(sorted(deep & twin))
    assert same.layers == both == (0, 15, 16, 17, 27) and same.ylabel == "Layer"
    n_cols = same.values.shape[1]

    def rows(grid, layers):
        return grid.values[[grid.layers.index(k) for k in layers], :n_cols]

    np.testing.assert_allclose(same.values, rows(agg["deep"], both) - rows(agg["union"], both), rtol=1e-12)
    assert plotting.layer_gaps(same.layers) == (0, 3)
    # different depths: today's relative-depth rule (half's layer k, deep's round(27 k / 13)), the
    # rows where both sides have a value
    rel = by_title["deep minus half | logit_lens | mean"]
    m, n = DEPTHS["half"], DEPTHS["deep"]
    ks = [k for k in range(m) if k in half and round(k * (n - 1) / (m - 1)) in deep]
    assert ks == [0, 7, 8, 9, 10, 13]  # half's 11 and 12 map to deep's 23 and 25, never computed
    assert rel.layers == tuple(round(k / (m - 1), 2) for k in ks) and rel.ylabel.startswith("Relative depth")
    n_cols = rel.values.shape[1]
    mapped = [round(k * (n - 1) / (m - 1)) for k in ks]
    np.testing.assert_allclose(rel.values, rows(agg["deep"], mapped) - rows(agg["half"], ks), rtol=1e-12)
    assert rel.gaps == (0, 4)  # half's 0 | 7 and 10 | 13
    fig = plotting.draw(site.heatmap_data(Figure(rel)))
    assert sorted(line.get_ydata()[0] for line in fig.axes[0].lines) == [0.5, 4.5]
    # `all` keeps the full relative-depth table (rows with no value show n/a)
    everything, _ = _grids(store_uri, parse_report_spec({**spec.describe(), "layers": "all"}))
    rel_all = next(g for g in everything if g.title == "deep minus half | logit_lens | mean")
    assert len(rel_all.layers) == m and rel_all.gaps is None


def test_relative_depth_keeps_the_rows_with_a_stored_counterpart(store_uri):
    grids, _ = _grids(store_uri, _spec(models=["full", "union"], runs="all", per_prompt=0, compare_groups=False))
    # full (4 layers, all stored) against union (28): full's k maps to union's 0, 9, 18, 27, of
    # which union (u1 and u2 together) stored 0 and 27
    rel = next(g for g in grids if g.kind == "difference")
    assert rel.title == "full minus union | logit_lens | mean"
    assert rel.layers == (0.0, 1.0) and rel.gaps == (0,)


# ------------------------------------------------------------------ no warnings
def test_observations_over_rows_without_values_raise_no_warning():
    values = np.array([[np.nan, np.nan, np.nan], [1.0, 2.0, np.nan], [4.0, np.nan, 6.0], [0.5, 0.5, 0.5]])
    grid = Grid(
        "g", "s", "t", (0, 1, 2, 3), ("Gen0", "Gen1", "Gen2"), values, np.ones((4, 3), int), 1, "kl", "aggregate", {}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        said = observe(Figure(grid))
        means = aggregate.nan_mean(values, axis=1)
    np.testing.assert_array_equal(np.isnan(means), [True, False, False, False])
    np.testing.assert_allclose(means[1:], [1.5, 5.0, 0.5], rtol=1e-15)
    assert "Layers with the highest mean kl: 2 (5), 1 (1.5), 3 (0.5)." in said
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(aggregate.nan_mean(values, axis=0), np.nanmean(values, axis=0))
