"""Comparison maps with bootstrap intervals over a constructed store (no model): the per-prompt
cells read from the store, the report's intervals against the same bootstrap on per-prompt
arrays read by plain DuckDB from the Parquet files (paired where both models hold the same
prompts, unpaired otherwise, groups each resampled within themselves), the API's table of the
same numbers, and a rebuild that is byte-identical."""

import json
import re
import warnings

import duckdb
import numpy as np
import pyarrow as pa
import pytest

import klstore
from klstore.report import aggregate, compare, intervals, site
from klstore.report.intervals import bootstrap_difference
from klstore.spec import parse_report_spec
from klstore.store import open_store, views
from klstore.store.tables import KL_SCHEMA

LAYERS, TOKENS = 4, 3
# model -> prompt ids and their groups; m-a and m-b share theirs (paired), m-c does not
PROMPTS = {
    "m-a": [(f"p{i:02d}", f"g{i // 5}") for i in range(10)],
    "m-b": [(f"p{i:02d}", f"g{i // 5}") for i in reversed(range(10))],  # written in another order
    "m-c": [(f"q{i:02d}", f"g{i % 2}") for i in range(7)],
    "m-g": [(f"s{i:02d}", f"h{i % 5}") for i in range(15)],  # 5 groups: each against the rest
}
SHORT = {("m-a", "p03"): 2, ("m-b", "p07"): 1, ("m-g", "s04"): 2}  # (model, prompt): tokens reached
TIGHT = {"rtol": 1e-9, "atol": 1e-9}  # float32 values summed by DuckDB and by numpy
SPEC = {"name": "t", "resamples": 400, "bootstrap_seed": 11, "confidence": 0.9, "per_prompt": 0}


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("intervals") / "store")
    store = open_store(uri, create=True)
    rng = np.random.default_rng(4)
    ids = sorted({p for prompts in PROMPTS.values() for p, _ in prompts})
    levels = dict(zip(ids, rng.lognormal(0.0, 0.8, len(ids))))  # a prompt's own level, in every model
    for m, (model, prompts) in enumerate(PROMPTS.items()):
        rows = []
        for prompt_id, group in prompts:
            level = levels[prompt_id]
            for layer in range(LAYERS):
                for gen_idx in range(SHORT.get((model, prompt_id), TOKENS)):
                    kl = level * np.exp(-layer / 2) * (1 + 0.3 * m) * rng.lognormal(0.0, 0.1)
                    rows.append(
                        {
                            "prompt_id": prompt_id,
                            "prompt_group": group,
                            "layer": layer,
                            "gen_idx": gen_idx,
                            "kl": float(kl),
                            "top1_match": layer == LAYERS - 1,
                            "n_layers": LAYERS,
                        }
                    )
        table = pa.Table.from_pylist(rows, schema=KL_SCHEMA)
        store.write("kl", table, "part-0.parquet", model=model, probe="logit_lens", run_id="r1")
    store.write_run("r1", "t", "completed", {}, {})
    return uri


def plain_cells(uri, model, group=None):
    """Per-prompt values (n_prompts, LAYERS, TOKENS), prompts by id, NaN where none: plain DuckDB."""
    raw = duckdb.connect()
    rows = raw.execute(
        f"SELECT prompt_id, layer, gen_idx, kl FROM read_parquet('{uri}/kl/**/*.parquet', hive_partitioning = true) "
        "WHERE model = ? AND (? IS NULL OR prompt_group = ?)",
        [model, group, group],
    ).fetchall()
    ids = sorted({r[0] for r in rows})
    out = np.full((len(ids), LAYERS, TOKENS), np.nan)
    for prompt_id, layer, gen_idx, kl in rows:
        out[ids.index(prompt_id), layer, gen_idx] = kl
    return out


def grids(uri, **changes):
    con = views.connect(uri)
    spec = parse_report_spec({**SPEC, **changes})
    where, _ = aggregate.filters(con, spec)
    return {g.title: g for g in aggregate.collect(con, spec, where) if g.kind == "difference"}, spec


def test_per_prompt_cells_are_the_stored_rows(uri):
    con = views.connect(uri)
    spec = parse_report_spec(SPEC)
    where, _ = aggregate.filters(con, spec)
    cells = compare.fetch(con, where, "kl", "m-b", "logit_lens")
    assert cells.units == tuple(("r1", f"p{i:02d}") for i in range(10)) and cells.layers == (0, 1, 2, 3)
    assert cells.groups == tuple(f"g{i // 5}" for i in range(10))
    np.testing.assert_allclose(cells.sample.values(), plain_cells(uri, "m-b"), rtol=1e-7, equal_nan=True)
    assert cells.sample.counts[7].sum() == LAYERS * 1  # p07 reached one token
    select = cells.select((3, 9, 0), 4, [2, 0])  # a layer not stored and a column past the end: no value
    assert select.counts[:, 1].sum() == 0 and select.counts[:, :, 3].sum() == 0
    np.testing.assert_array_equal(select.sums[0, 0, :3], cells.sample.sums[2, 3])


def test_model_comparisons_paired_on_shared_prompts_and_unpaired_otherwise(uri):
    found, spec = grids(uri)
    a, b, c = (plain_cells(uri, m) for m in ("m-a", "m-b", "m-c"))
    for title, x, y, paired in (
        ("m-a minus m-b | logit_lens | mean", a, b, True),
        ("m-a minus m-c | logit_lens | mean", a, c, False),
    ):
        grid = found[title]
        ci = grid.interval
        expected = bootstrap_difference(x, y, paired=paired, level=0.9, resamples=400, seed=11)
        assert (ci.paired, ci.level, ci.resamples, ci.seed, ci.n_a, ci.n_b) == (paired, 0.9, 400, 11, len(x), len(y))
        np.testing.assert_allclose(grid.values, np.nanmean(x, 0) - np.nanmean(y, 0), **TIGHT)
        np.testing.assert_allclose(ci.low, expected.low, **TIGHT)
        np.testing.assert_allclose(ci.high, expected.high, **TIGHT)
        assert np.isfinite(ci.low).all() and (ci.low <= grid.values + 1e-12).any()
    # m-a's levels are 1.0x, m-b's 1.3x the same prompts' (paired: narrow); m-c has its own prompts
    width = {t: float(np.mean(found[t].interval.high - found[t].interval.low)) for t in found if "minus m-" in t}
    assert width["m-a minus m-b | logit_lens | mean"] < width["m-a minus m-c | logit_lens | mean"]


def test_group_comparisons_resample_each_group_on_its_own_stream(uri):
    found, spec = grids(uri)
    g0, g1 = plain_cells(uri, "m-a", "g0"), plain_cells(uri, "m-a", "g1")
    ci = found["m-a | logit_lens | g0 minus g1"].interval
    expected = bootstrap_difference(g0, g1, paired=False, level=0.9, resamples=400, seed=11)  # streams 0 and 1
    np.testing.assert_allclose(ci.low, expected.low, **TIGHT)
    np.testing.assert_allclose(ci.high, expected.high, **TIGHT)
    # five groups: each against the mean of the other four group means, in every replicate
    groups = [plain_cells(uri, "m-g", f"h{k}") for k in range(5)]
    rngs = [np.random.default_rng([11, k]) for k in range(5)]
    diffs = []
    with warnings.catch_warnings():  # a resample of h4 that holds only s04 has no Gen2: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.array(
            [[np.nanmean(g[r.integers(0, len(g), size=len(g))], 0) for _ in range(400)] for g, r in zip(groups, rngs)]
        )
        for k in range(5):
            rest = np.nanmean(means[[j for j in range(5) if j != k]], axis=0)
            diffs.append(means[k] - rest)
    assert np.isnan(diffs[4]).any()  # the case the finite-only percentiles are for
    for k in range(5):
        grid = found[f"m-g | logit_lens | h{k} minus the other groups"]
        others = [j for j in range(5) if j != k]
        low, high = np.full((LAYERS, TOKENS), np.nan), np.full((LAYERS, TOKENS), np.nan)
        for cell in np.ndindex(LAYERS, TOKENS):
            column = diffs[k][(slice(None), *cell)]
            low[cell], high[cell] = np.percentile(column[np.isfinite(column)], [5, 95])
        enough = (np.isfinite(groups[k]).sum(0) >= 2) & (sum(np.isfinite(groups[j]).sum(0) for j in others) >= 2)
        np.testing.assert_allclose(grid.interval.low, np.where(enough, low, np.nan), **TIGHT)
        np.testing.assert_allclose(grid.interval.high, np.where(enough, high, np.nan), **TIGHT)
        assert grid.interval.n_b == 12 and not grid.interval.paired


def test_the_api_gives_the_numbers_of_the_maps(uri):
    found, spec = grids(uri)
    table = klstore.open_store(uri).differences(**SPEC)
    assert len(table) == sum(g.values.size for g in found.values())
    for title, grid in found.items():
        mine = table[table["figure"] == grid.fig_id]
        assert len(mine) == grid.values.size, title
        np.testing.assert_array_equal(mine["difference"].to_numpy().reshape(grid.values.shape), grid.values)
        np.testing.assert_array_equal(mine["low"].to_numpy().reshape(grid.values.shape), grid.interval.low)
        np.testing.assert_array_equal(mine["high"].to_numpy().reshape(grid.values.shape), grid.interval.high)
        marked = intervals.differences(grid.values, grid.interval, None)
        np.testing.assert_array_equal(mine["is_difference"].to_numpy().reshape(grid.values.shape), marked)
        assert set(mine["paired"]) == {grid.interval.paired} and set(mine["level"]) == {0.9}
    assert table["is_difference"].any() and not table["is_difference"].all()
    assert list(table.columns) == list(site.DIFFERENCE_COLUMNS)
    with pytest.raises(klstore.KlstoreError, match="confidence must be a level between 0 and 1"):
        klstore.open_store(uri).differences(confidence=95)


def test_a_rebuild_is_byte_identical(uri, tmp_path):
    """Two forced builds of the same spec: every file equal, but for the build time."""
    spec = parse_report_spec({**SPEC, "models": ["m-a", "m-b"]})
    store = open_store(uri)
    built = []
    for name in ("one", "two"):
        site.build(store, spec, out=tmp_path / name, force=True, log=lambda m: None, workers=1)
        built.append((tmp_path / name).resolve())
    files = sorted(p.relative_to(built[0]) for p in built[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(built[1]) for p in built[1].rglob("*") if p.is_file())
    assert any(str(f).endswith(".png") for f in files) and any(str(f).endswith(".svg") for f in files)
    for path in files:
        first, second = (b / path for b in built)
        if path.name == "manifest.json":
            one, two = (json.loads(p.read_text()) for p in (first, second))
            one.pop("built_at"), two.pop("built_at")
            assert one == two
        elif path.name == "index.html":
            stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC")
            assert stamp.sub("", first.read_text()) == stamp.sub("", second.read_text())
        else:
            assert first.read_bytes() == second.read_bytes(), path
    manifest = json.loads((built[0] / "manifest.json").read_text())
    entry = next(f for f in manifest["figures"].values() if f["title"] == "m-a minus m-b | logit_lens | mean")
    assert entry["interval"] == {
        "level": 0.9,
        "resamples": 400,
        "seed": 11,
        "paired": True,
        "statistic": "mean",
        "prompts": [10, 10],
        "differences": entry["interval"]["differences"],
    }
    assert any(
        "90% paired bootstrap interval (400 resamples of 10 prompts, seed 11)" in o for o in entry["observations"]
    )
    assert "90% paired bootstrap interval" in (built[0] / "report.md").read_text()
