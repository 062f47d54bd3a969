"""Reports: aggregates vs independent SQL, figure contents, pages, escaping, incrementality.
(In a browser: tests/integration/test_report_browser.py; observation rules: tests/unit/test_observe.py.)"""

import io
import json
import shutil

import duckdb
import numpy as np
import pytest
from layer_stores import llama
from tiny_models import ToyTokenizer, build

from klstore.cli import main
from klstore.core.models import from_objects
from klstore.errors import KlstoreError
from klstore.report import aggregate, plotting, site
from klstore.run.worker import Worker
from klstore.spec import ComputeSpec, GenerationSpec, ProbeSpec, Prompt, parse_report_spec
from klstore.store import open_store

EVIL = "<script>alert('x')</script> & more"
PROMPTS = [
    Prompt("a-evil" if text == EVIL else f"p{i}", text, group)
    for i, (text, group) in enumerate(
        [
            ("The quick brown fox", "animals"),
            ("A lazy dog sleeps", "animals"),
            ("Cats purr softly", "animals"),
            ("One two three four", "numbers"),
            ("Five six seven", "numbers"),
            (EVIL, "numbers"),
        ]
    )
]
JOB = ComputeSpec((ProbeSpec("logit_lens"), ProbeSpec("skip")), "all", ("kl", "js"), GenerationSpec(4))


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("report") / "store")
    for label, model in (("tiny-a", build("llama")), ("tiny-b", build("gpt2")), ("tiny-deep", llama(6))):
        worker = Worker(label, label, uri, loaded=from_objects(label, model, ToyTokenizer()))
        worker.run_shard("r1", PROMPTS[:3], JOB)
        worker.run_shard("r1", PROMPTS[3:], JOB)
    store = open_store(uri)
    store.write_run("r1", "t", "completed", {}, {})
    return uri


def _spec(**changes):
    return parse_report_spec({"name": "t", **changes})


def _gather(store_uri, spec):
    """Every grid of the report (aggregates, differences, per-prompt examples) and its pages."""
    from klstore.store import views

    con = views.connect(store_uri)
    where, chosen = aggregate.filters(con, spec)
    return site.gather(con, spec, where, chosen), con


def _plain_duckdb(store_uri):
    con = duckdb.connect()
    con.execute(
        f"CREATE VIEW raw AS SELECT * FROM read_parquet('{store_uri}/kl/**/*.parquet', hive_partitioning = true)"
    )
    return con


@pytest.mark.parametrize("how", ["mean", "median"])
def test_aggregates_equal_independent_sql(store_uri, how):
    from klstore.store import views

    spec = _spec(aggregate=how, per_prompt=0)
    con = views.connect(store_uri)
    grids = aggregate.collect(con, spec, aggregate.filters(con, spec)[0])
    raw = _plain_duckdb(store_uri)
    fn = "avg" if how == "mean" else "median"
    checked = 0
    for grid in (g for g in grids if g.kind == "aggregate"):
        labels = grid.labels
        where = " AND ".join(f"{k} = '{v}'" for k, v in labels.items())
        rows = raw.execute(
            f"SELECT layer, gen_idx, {fn}(kl), count(DISTINCT prompt_id) FROM raw WHERE {where} GROUP BY ALL"
        ).fetchall()
        expected = np.full(grid.values.shape, np.nan)
        for layer, gen_idx, value, _ in rows:
            expected[grid.layers.index(layer), gen_idx] = value
        np.testing.assert_allclose(grid.values, expected, rtol=1e-12)
        n = raw.execute(f"SELECT count(DISTINCT prompt_id) FROM raw WHERE {where}").fetchone()[0]
        assert grid.n_prompts == n and f"{how} of {n} prompts" in grid.title
        checked += 1
    assert checked == 3 * 2 + 3 * 2 * 2  # model x probe, and x 2 groups


def test_comparisons_by_layer_and_by_relative_depth(store_uri):
    from klstore.store import views

    spec = _spec(per_prompt=0)
    con = views.connect(store_uri)
    grids = {g.title: g for g in aggregate.collect(con, spec, aggregate.filters(con, spec)[0])}
    same = grids["tiny-a minus tiny-b | logit_lens | mean"]
    a = grids["tiny-a | logit_lens | mean of 6 prompts"].values
    b = grids["tiny-b | logit_lens | mean of 6 prompts"].values
    np.testing.assert_allclose(same.values, a - b)
    assert same.layers == (0, 1, 2, 3) and same.ylabel == "Layer"
    deep = grids["tiny-a minus tiny-deep | skip | mean"]  # 4 vs 6 layers: by relative depth
    d = grids["tiny-deep | skip | mean of 6 prompts"].values
    a_skip = grids["tiny-a | skip | mean of 6 prompts"].values
    np.testing.assert_allclose(deep.values, a_skip - d[[0, 2, 3, 5]])  # round(k * 5 / 3)
    assert deep.layers == (0.0, 0.33, 0.67, 1.0) and deep.ylabel.startswith("Relative depth")
    groups = grids["tiny-a | skip | animals minus numbers"]
    np.testing.assert_allclose(
        groups.values,
        grids["tiny-a | skip | animals | mean of 3 prompts"].values
        - grids["tiny-a | skip | numbers | mean of 3 prompts"].values,
    )


def test_figure_contents_from_matplotlib_objects(store_uri):
    spec = _spec(layers="0,-1", per_prompt=1, color_scale="linear")
    report, con = _gather(store_uri, spec)
    figures = {f.grid.fig_id: f for f in report.figures}
    grids = [f.grid for f in report.figures]
    grid = next(g for g in grids if g.title == "tiny-a | logit_lens | mean of 6 prompts")
    fig = plotting.draw(site.heatmap_data(figures[grid.fig_id]))
    ax, bar = fig.axes
    assert ax.get_xlabel() == "Generated Token" and ax.get_ylabel() == "Layer"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Gen0", "Gen1", "Gen2", "Gen3"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "3"]
    assert bar.get_ylabel() == "KL divergence (nats)" and ax.get_title() == grid.title
    assert ax.images[0].get_cmap().name == "YlOrRd"
    np.testing.assert_allclose(ax.images[0].get_array(), grid.values)
    assert _cell_texts(ax, grid.values.shape) == [f"{v:.2f}" for v in grid.values.reshape(-1)]
    assert grid.values[1].max() < 1e-5  # last layer's logit lens: 0 up to float error
    prompt_grid = next(g for g in grids if g.kind == "prompt" and g.labels["model"] == "tiny-a")
    fig = plotting.draw(site.heatmap_data(figures[prompt_grid.fig_id]))
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    tokens = [
        r[0]
        for r in con.execute(
            "SELECT token_text FROM generations WHERE model = 'tiny-a' AND prompt_id = ? ORDER BY gen_idx",
            [prompt_grid.labels["prompt_id"]],
        ).fetchall()
    ]
    assert labels == list(plotting.column_labels(4, tokens)) and labels[0].startswith("Gen0\n")
    diff = next(g for g in grids if g.kind == "difference")
    fig = plotting.draw(site.heatmap_data(figures[diff.fig_id]))
    assert fig.axes[0].images[0].get_cmap().name == "RdBu_r"
    lo, hi = fig.axes[0].images[0].get_clim()
    assert lo == -hi


def _cell_texts(ax, shape) -> list:
    """The annotation of each cell, row by row: a column's values are one text per colour,
    a line per row (empty where the other colour's text holds the value)."""
    cells = {}
    for text in ax.texts:
        column = round(text.get_position()[0])
        for row, line in enumerate(text.get_text().split("\n")):
            if line:
                assert (row, column) not in cells
                cells[(row, column)] = line
    return [cells.get((r, c)) for r in range(shape[0]) for c in range(shape[1])]


@pytest.mark.parametrize("rows", [1, 4, 18, 30, 61])
def test_column_annotations_line_up_with_the_rows(rows):
    """Each column's lines span exactly the heatmap's height, centred on it, in PNG and SVG
    (so the value of row r is drawn in row r)."""
    values = np.linspace(0, 9, rows * 3).reshape(rows, 3)
    fig = plotting.draw(plotting.HeatmapData(values, tuple(range(rows)), plotting.column_labels(3), "t"))
    ax = fig.axes[0]
    assert _cell_texts(ax, values.shape) == [f"{v:.2f}" for v in values.reshape(-1)]
    for dpi in (plotting.DPI, 72):  # the PNG's and the SVG's
        fig.set_dpi(dpi)
        renderer = fig.canvas.get_renderer()
        box = ax.get_window_extent(renderer)
        for text in ax.texts:
            extent = text.get_window_extent(renderer)
            assert extent.height == pytest.approx(box.height, abs=1.0)
            assert (extent.y0 + extent.y1) / 2 == pytest.approx((box.y0 + box.y1) / 2, abs=0.5)


def test_cells_reached_by_fewer_prompts_are_marked():
    data = plotting.HeatmapData(np.array([[1.0, 2.0]]), (0,), ("Gen0", "Gen1"), "t", counts=np.array([[5, 3]]))
    texts = [t.get_text() for t in plotting.draw(data).axes[0].texts]
    assert texts == ["1.00", "2.00\nn=3"]


def test_site_files_links_and_assets(store_uri, tmp_path):
    """The site's files: figures, pages per (model, probe) and per prompt, plotly.js once, and no
    address outside the site in any page (the browser checks are in test_report_browser.py)."""
    out = tmp_path / "site" / "rep"
    result = site.build(open_store(store_uri), _spec(per_prompt=2), out=out, log=lambda m: None)
    page = (out / "index.html").read_text()
    assert EVIL not in page and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more" in page  # a-evil
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["figures"]) == result["drawn"] and all(
        (out / f["png"]).stat().st_size > 1000 and (out / f["svg"]).exists() for f in manifest["figures"].values()
    )
    assert (out / "report.md").read_text().startswith("# KL report: t")
    assert sorted(p.name for p in (out / "assets").iterdir()) == ["plotly.min.js", "report.css", "report.js"]
    assert (out / "assets" / "plotly.min.js").stat().st_size > 1_000_000
    assert len(manifest["pages"]["probes"]) == 3 * 2 and manifest["pages"]["prompts"] == 3 * 2 * 6
    for html_file in [out / "index.html", *(out / "probes").iterdir(), *(out / "prompts").iterdir()]:
        text = html_file.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, html_file
    listing = (out / manifest["pages"]["probes"][0]).read_text()
    assert listing.count('href="../prompts/') == 6 and "settling layer per token" in listing


def test_a_store_from_before_lens_tokens_still_reports(store_uri, tmp_path):
    """kl files without the lens-token columns, no tokens table, and runs and shards rows from
    before noise floors: every page is still written, the prompt pages say the tokens were not
    stored, and the report says the noise floor was not measured (and marks nothing)."""
    import pyarrow.parquet as pq

    copy = tmp_path / "store"
    shutil.copytree(store_uri, copy)
    shutil.rmtree(copy / "tokens")
    for path in (copy / "kl").rglob("*.parquet"):
        table = pq.read_table(path, partitioning=None)
        pq.write_table(table.drop_columns(["topk_ids", "topk_probs", "gen_rank", "gen_logq"]), path)
    for path in [*(copy / "runs").rglob("*.parquet"), *(copy / "shards").rglob("*.parquet")]:
        pq.write_table(pq.read_table(path, partitioning=None).drop_columns(["noise_floor"]), path)
    out = tmp_path / "rep"
    site.build(open_store(str(copy)), _spec(per_prompt=1), out=out, log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pages"]["prompts"] == 3 * 2 * 6
    assert manifest["noise_floor"] == {"tiny-a": None, "tiny-b": None, "tiny-deep": None}
    assert all(f["noise_floor"] is None and f["below_noise_floor"] == 0 for f in manifest["figures"].values())
    assert not any("noise floor" in note.lower() for f in manifest["figures"].values() for note in f["observations"])
    for name in ("index.html", "report.md"):
        assert "Noise floor: not measured" in (out / name).read_text(), name
    svg = next(iter(manifest["figures"].values()))["svg"]
    assert "below-noise-floor" not in (out / svg).read_text()
    page = (out / "prompts").glob("prompt-tiny-a-logit_lens-p0-*.html").__next__().read_text()
    assert "No lens tokens were stored for this prompt" in page and "top-k tokens not stored" in page
    assert "Top-1 settling depth: " in page  # top1_match was stored before lens tokens were


def test_unchanged_rerun_redraws_nothing_and_changes_redraw_only_their_figures(store_uri, tmp_path):
    out = tmp_path / "rep"
    spec = _spec(per_prompt=0)
    first = site.build(open_store(store_uri), spec, out=out, log=lambda m: None)
    build_dir = out.resolve()
    again = site.build(open_store(store_uri), spec, out=out, log=lambda m: None)
    assert again["drawn"] == 0 and not again["changed"] and out.resolve() == build_dir
    copy = tmp_path / "store2"
    shutil.copytree(store_uri, copy)
    spec2 = _spec(per_prompt=0)
    out2 = tmp_path / "rep2"
    base = site.build(open_store(str(copy)), spec2, out=out2, log=lambda m: None)
    worker = Worker("tiny-a", "tiny-a", str(copy), loaded=from_objects("tiny-a", build("llama"), ToyTokenizer()))
    worker.run_shard(
        "r1",
        [Prompt("new", "Brand new prompt", "animals")],
        ComputeSpec((ProbeSpec("skip"),), "all", ("kl",), GenerationSpec(4)),
    )
    update = site.build(open_store(str(copy)), spec2, out=out2, log=lambda m: None)
    assert update["changed"] and 0 < update["drawn"] < base["drawn"]
    # redrawn: tiny-a/skip aggregates (2 groups + overall), its group comparison, and its 2 model comparisons
    assert update["drawn"] == 1 + 2 + 1 + 2
    assert not any(p.name != out2.resolve().name for p in (tmp_path / ".rep2.builds").iterdir())
    forced = site.build(open_store(str(copy)), spec2, out=out2, force=True, log=lambda m: None)
    assert forced["drawn"] == base["drawn"]
    assert first["drawn"] > 0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"models": ["nope"]}, "model 'nope' is not in the store; models: tiny-a, tiny-b, tiny-deep"),
        ({"groups": ["zzz"]}, "group 'zzz' is not in the store; groups: animals, numbers"),
        ({"runs": ["r9"]}, "run 'r9' is not in the store; runs: r1"),
    ],
)
def test_spec_naming_what_is_not_in_the_store(store_uri, tmp_path, changes, message):
    with pytest.raises(KlstoreError, match=message):
        site.build(open_store(store_uri), _spec(**changes), out=tmp_path / "r", log=lambda m: None)


def test_report_cli_bad_input(store_uri, tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: x\nlayer: all\n")
    assert main(["report", str(spec), "--store", store_uri]) == 2
    assert "s.yaml: layer: unknown key" in capsys.readouterr().err
    spec.write_text("name: x\naggregate: mode\n")
    assert main(["report", str(spec), "--store", store_uri]) == 2
    assert "aggregate must be mean or median, got 'mode'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", "--store", str(empty)]) == 2
    assert "the store is empty" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["report", "--store", store_uri, "--out", str(blocker / "rep")]) == 2
    assert f"cannot write the report to {blocker / 'rep'}" in capsys.readouterr().err
    assert main(["report", "--store", store_uri, "--out", str(tmp_path / "ok")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "ok" / "index.html")


def test_partition_folder_with_a_quote_reports_it(store_uri, tmp_path):
    """Labels are validated, but a folder renamed on disk must still be read as data, not SQL."""
    copy = tmp_path / "store"
    shutil.copytree(store_uri, copy)
    for table in ("kl", "generations", "prompts"):
        (copy / table / "model=tiny-a").rename(copy / table / "model=a'b")
    for spec in (_spec(per_prompt=1), _spec(per_prompt=1, runs=["r1"], models=["a'b", "tiny-b"])):
        out = tmp_path / f"rep-{len(spec.models or ())}"
        site.build(open_store(str(copy)), spec, out=out, log=lambda m: None)
        titles = [f["title"] for f in json.loads((out / "manifest.json").read_text())["figures"].values()]
        assert "a'b | logit_lens | mean of 6 prompts" in titles
        assert "a'b minus tiny-b | skip | mean" in titles
        assert any(t.startswith("a'b | skip | ") and t.endswith(" prompts") and "animals" in t for t in titles)
        assert "a&#39;b | logit_lens | mean of 6 prompts" in (out / "index.html").read_text()
    with pytest.raises(KlstoreError, match="model \"a'c\" is not in the store; models: a'b, tiny-b, tiny-deep"):
        site.build(open_store(str(copy)), _spec(models=["a'c"]), out=tmp_path / "r", log=lambda m: None)


# ------------------------------------------------------------------ noise floor
# tiny-a and tiny-deep in run r1, tiny-b in r2 (nats). Each model answers to its own shards' floors;
# tiny-b's shards record none (as before shards.noise_floor), so it answers to its run's.
SHARD_FLOORS = {"tiny-a": 0.4, "tiny-deep": 0.25, "tiny-b": None}
FLOORS = {"r1": 0.4, "r2": 0.9}  # runs.noise_floor: r1's is the larger of its two models'


@pytest.fixture(scope="module")
def floor_store(store_uri, tmp_path_factory):
    """The module's store with tiny-b's rows moved to a run of its own, and shards and runs rows
    whose noise floors (SHARD_FLOORS, FLOORS: far above fp32's ~1e-6) put some cells of every
    model below them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    copy = tmp_path_factory.mktemp("floor") / "store"
    shutil.copytree(store_uri, copy)
    for folder in sorted(copy.rglob("run_id=r1")):
        if "model=tiny-b" in folder.parts:
            folder.rename(folder.with_name("run_id=r2"))
    for model, value in SHARD_FLOORS.items():
        for path in (copy / "shards" / f"model={model}").rglob("*.parquet"):
            table = pq.read_table(path, partitioning=None)
            column = pa.array([value] * table.num_rows, pa.float32())
            pq.write_table(table.set_column(table.schema.get_field_index("noise_floor"), "noise_floor", column), path)
    shutil.rmtree(copy / "runs")
    store = open_store(str(copy))
    for run, floor in FLOORS.items():
        store.write_run(run, run, "completed", {}, {}, noise_floor=floor)
    return str(copy)


def _plain_floors(uri) -> dict:
    """model -> its largest floor over its runs, from the files by plain DuckDB: per (model, run)
    the largest shards.noise_floor, or runs.noise_floor where no shard of the run has one."""
    raw = _plain_duckdb(uri)
    for table in ("runs", "shards"):
        raw.execute(
            f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{uri}/{table}/**/*.parquet', hive_partitioning = true)"
        )
    return dict(
        raw.execute("""
        WITH pairs AS (SELECT DISTINCT model, run_id FROM raw),
        mine AS (SELECT model, run_id, max(noise_floor) AS f FROM shards GROUP BY ALL),
        run_any AS (SELECT run_id, max(noise_floor) AS f FROM shards GROUP BY ALL)
        SELECT p.model, max(CASE WHEN a.f IS NULL THEN r.noise_floor ELSE m.f END)
        FROM pairs p JOIN mine m USING (model, run_id) JOIN run_any a USING (run_id)
        JOIN runs r USING (run_id) GROUP BY ALL""").fetchall()
    )


def _plain_means(raw, model, probe, layers) -> np.ndarray:
    rows = raw.execute(
        "SELECT layer, gen_idx, avg(kl) FROM raw WHERE model = ? AND probe = ? GROUP BY ALL", [model, probe]
    ).fetchall()
    out = np.full((len(layers), max(r[1] for r in rows) + 1), np.nan)
    for layer, gen_idx, value in rows:
        if layer in layers:
            out[layers.index(layer), gen_idx] = value
    return out


def test_cells_below_the_noise_floor_are_exactly_those_of_a_plain_computation(floor_store):
    """Aggregates use their model's floor, model comparisons the larger of the two sides', group
    comparisons their model's; the marked cells are |value| < floor by plain SQL over the files."""
    floors = _plain_floors(floor_store)
    assert floors == pytest.approx({"tiny-a": 0.4, "tiny-b": 0.9, "tiny-deep": 0.25})
    report, _ = _gather(floor_store, _spec(per_prompt=1))
    raw = _plain_duckdb(floor_store)
    checked = {"aggregate": 0, "difference": 0, "prompt": 0}
    for shown in report.figures:
        grid = shown.grid
        if grid.kind == "aggregate" and set(grid.labels) == {"model", "probe"}:
            floor = floors[grid.labels["model"]]
            expected = np.abs(_plain_means(raw, grid.labels["model"], grid.labels["probe"], list(grid.layers))) < floor
        elif grid.kind == "difference" and "model" not in grid.labels:  # model vs model
            a, b, probe = grid.labels["a"], grid.labels["b"], grid.labels["probe"]
            floor = max(floors[a], floors[b])
            va, vb = (_plain_means(raw, m, probe, list(range(6 if m == "tiny-deep" else 4))) for m in (a, b))
            # b == tiny-deep: by relative depth, its layers round(k * 5 / 3) under the other's k
            diff = va - (vb[[0, 2, 3, 5]] if b == "tiny-deep" else vb)
            expected = np.abs(diff[:, : grid.values.shape[1]]) < floor
        elif grid.kind == "difference":  # group vs group, one model
            floor = floors[grid.labels["model"]]
            expected = np.abs(grid.hover["a"] - grid.hover["b"]) < floor
        elif grid.kind == "prompt":
            floor = floors[grid.labels["model"]]
            expected = np.abs(grid.values) < floor
        else:
            continue
        assert shown.noise_floor == pytest.approx(floor), grid.title
        np.testing.assert_array_equal(shown.below_floor, expected, err_msg=grid.title)
        assert 0 < expected.sum(), grid.title
        n = int(expected.sum())
        assert any(
            note.startswith(f"Noise floor {floor:.2g} nats") and f": {n} of {expected.size} " in note
            for note in shown.observations
        ), (grid.title, shown.observations)
        checked[grid.kind] += 1
    assert checked == {"aggregate": 6, "difference": 6 + 6, "prompt": 6}
    partial = next(f for f in report.figures if f.grid.title == "tiny-a | logit_lens | mean of 6 prompts")
    assert 0 < partial.below_floor.sum() < partial.grid.values.size


def test_differences_below_the_floor_are_never_called_differences(floor_store):
    """A cell counts as higher or lower only when it clears the floor and its bootstrap interval
    excludes 0 (klstore.report.intervals; the rule on constructed grids: tests/unit/test_intervals.py)."""
    report, _ = _gather(floor_store, _spec(per_prompt=0))
    for shown in (f for f in report.figures if f.grid.kind == "difference"):
        grid = shown.grid
        finite, floor, ci = np.isfinite(grid.values), shown.noise_floor, grid.interval
        real = finite & (np.abs(grid.values) >= floor) & ((ci.low > 0) | (ci.high < 0))
        first = shown.observations[0]
        if not real.any():
            assert first.startswith(f"No cell shows a difference between {grid.labels['a']} and {grid.labels['b']}")
        else:
            higher, lower = int((real & (grid.values > 0)).sum()), int((real & (grid.values < 0)).sum())
            assert first.startswith(
                f"{grid.labels['a']} is higher than {grid.labels['b']} in {higher} of {int(finite.sum())} cells "
                f"and lower in {lower} (a cell counts when its 95% interval excludes 0 and its size clears the "
                f"noise floor of {floor:.2g} nats)"
            )


def test_the_site_shows_the_floor_per_model_and_marks_its_figures(floor_store, tmp_path):
    """index.html and report.md name each model's floor; the PNG/SVG figures dot exactly the
    cells below it, the interactive ones carry a marker layer and a hover line; a floor recorded
    later redraws only the figures it applies to."""
    copy = tmp_path / "store"
    shutil.copytree(floor_store, copy)
    out = tmp_path / "rep"
    spec = _spec(per_prompt=1)
    site.build(open_store(str(copy)), spec, out=out, log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["noise_floor"] == pytest.approx({"tiny-a": 0.4, "tiny-b": 0.9, "tiny-deep": 0.25})
    line = "Noise floor: tiny-a 0.4 nats, tiny-b 0.9 nats, tiny-deep 0.25 nats"
    index, markdown = (out / "index.html").read_text(), (out / "report.md").read_text()
    assert line in index and line in markdown and "not measured" not in index
    assert "<th>noise floor</th>" in index and "<td>0.9 nats</td>" in index
    report, _ = _gather(str(copy), spec)
    by_id = {f.grid.fig_id: f for f in report.figures}
    for fig_id, entry in manifest["figures"].items():
        assert entry["below_noise_floor"] == int(by_id[fig_id].below_floor.sum()) > 0
        assert (out / entry["svg"]).read_text().count('id="below-noise-floor"') == 1
    shown = by_id[next(f for f, e in manifest["figures"].items() if e["title"] == "tiny-b | skip | mean of 6 prompts")]
    grid = shown.grid
    fig = plotting.draw(site.heatmap_data(shown))
    dots = next(c for c in fig.axes[0].collections if c.get_gid() == "below-noise-floor")
    cells = {(round(y - 0.3), round(x + 0.36)) for x, y in dots.get_offsets()}
    assert cells == {tuple(map(int, rc)) for rc in np.argwhere(shown.below_floor)}
    assert fig.axes[0].get_title().endswith("\n\u2022 below the noise floor (0.9 nats)")
    figures = json.loads(index.split('id="klstore-figures">')[1].split("</script>")[0])
    layer = next(t for t in figures[grid.fig_id]["data"] if t.get("name") == "below the noise floor")
    assert {(round(y - 0.3), round(x + 0.36)) for x, y in zip(layer["x"], layer["y"])} == cells
    hover = figures[grid.fig_id]["data"][0]["customdata"]
    for r, row in enumerate(hover):
        for c, text in enumerate(row):
            assert ("below the noise floor (0.9 nats)" in text) == ((r, c) in cells)
    # tiny-b's run records a new floor: only the figures that read tiny-b are redrawn
    open_store(str(copy)).write_run("r2", "r2", "completed", {}, {}, noise_floor=0.8)
    again = site.build(open_store(str(copy)), spec, out=out, log=lambda m: None)
    tiny_b = [f for f, e in manifest["figures"].items() if "tiny-b" in json.dumps(e["inputs"])]
    assert again["changed"] and again["drawn"] == len(tiny_b) > 0
    assert again["reused"] == len(manifest["figures"]) - len(tiny_b) > 0
    assert "tiny-b 0.8 nats" in (out / "report.md").read_text()


HOSTILE = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "[x](javascript:alert(1))", r"$\foo{$"]


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory):
    """One tiny model; prompt ids and groups that are HTML, a Markdown link and broken mathtext."""
    uri = str(tmp_path_factory.mktemp("hostile") / "store")
    prompts = [Prompt(text, f"Prompt {i} says {text}", HOSTILE[-1 - i]) for i, text in enumerate(HOSTILE)]
    worker = Worker("tiny-a", "tiny-a", uri, loaded=from_objects("tiny-a", build("llama"), ToyTokenizer()))
    worker.run_shard("r1", prompts, ComputeSpec((ProbeSpec("logit_lens"),), "all", ("kl",), GenerationSpec(3)))
    return uri


def test_hostile_ids_and_groups_are_escaped_in_html_and_markdown(hostile_store, tmp_path):
    out = tmp_path / "rep"
    site.build(open_store(hostile_store), _spec(per_prompt=len(HOSTILE)), out=out, log=lambda m: None)
    titles = [f["title"] for f in json.loads((out / "manifest.json").read_text())["figures"].values()]
    assert all(any(text in t for t in titles) for text in HOSTILE)  # they did reach the report
    markdown = (out / "report.md").read_text()
    for raw in ("<script>", "<img", "](javascript:"):
        assert raw not in markdown
    assert r"&lt;script&gt;alert\(1\)&lt;/script&gt;" in markdown
    assert r"\[x\]\(javascript:alert\(1\)\)" in markdown
    page = (out / "index.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert 'href="javascript:' not in page and "[x](javascript:alert(1))" in page  # plain text in HTML
    pages = [out / "index.html", *(out / "probes").iterdir(), *(out / "prompts").iterdir()]
    assert len(pages) == 1 + 1 + len(HOSTILE)
    for path in pages:
        text = path.read_text()
        assert text.count("<script") == 3 and "<img src=x" not in text, path  # figure JSON, plotly.js, report.js
        figures = text.split('id="klstore-figures">')[1].split("</script>")[0]
        assert "<" not in figures and ">" not in figures and "&" not in figures  # \u003c etc.
        assert all(json.loads(figures).keys())


def test_mathtext_in_ids_is_drawn_literally(hostile_store):
    figures = _gather(hostile_store, _spec(per_prompt=len(HOSTILE)))[0].figures
    grid = next(f for f in figures if f.grid.kind == "prompt" and f.grid.labels["prompt_id"] == r"$\foo{$")
    fig = plotting.draw(site.heatmap_data(grid))
    fig.savefig(io.BytesIO(), format="png")  # mathtext would raise: unknown symbol \foo
    # (a second title line names the noise floor the worker measured in its shard)
    assert fig.axes[0].get_title().split("\n")[0] == r"tiny-a | logit_lens | $\foo{$"
    group = next(f for f in figures if f.grid.labels.get("prompt_group") == r"$\foo{$" and f.grid.kind == "aggregate")
    fig = plotting.draw(site.heatmap_data(group))
    fig.savefig(io.BytesIO(), format="svg")
    assert fig.axes[0].get_title().startswith(r"tiny-a | logit_lens | $\foo{$ | mean of ")
    labels = plotting.draw(plotting.HeatmapData(np.ones((1, 1)), (0,), plotting.column_labels(1, ["$x$"]), "t"))
    assert [t.get_text() for t in labels.axes[0].get_xticklabels()] == ["Gen0\n$x$"]


@pytest.mark.parametrize(
    "text, escaped",
    [
        ("plain words 0.5", "plain words 0.5"),
        ("<b>&'\"", "&lt;b&gt;&amp;&#x27;&quot;"),
        ("[x](javascript:alert(1))", r"\[x\]\(javascript:alert\(1\)\)"),
        (r"a|b *c* _d_ `e` #f !g ~h \i", r"a\|b \*c\* \_d\_ \`e\` \#f \!g \~h \\i"),
        ("- item", r"\- item"),
        ("1. item", r"1\. item"),
        ("-0.5", "-0.5"),
        ("see https://x.org or www.x.org", r"see https\://x.org or www\.x.org"),
        ("two\nlines", "two lines"),
    ],
)
def test_markdown_escaping(text, escaped):
    assert site.md(text) == escaped
