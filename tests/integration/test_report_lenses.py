"""The report's Lenses section (klstore/report/lenses.py), on a constructed store: a tiny model's
kl rows from a real worker, and `lenses`/`lens_eval` rows written with pyarrow into the table
folders the Store reads. The numbers drawn and tabled are the rows' own; the sentences name the
right layers; a store without lens tables gets no section; hostile labels stay text."""

import io
import json
import shutil
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_models import ToyTokenizer, build

from klstore.core.models import from_objects
from klstore.report import aggregate, interactive, lineplot, site
from klstore.report.floor import LENS_EVAL_FLOOR
from klstore.run.worker import Worker
from klstore.spec import ComputeSpec, GenerationSpec, ProbeSpec, Prompt, parse_report_spec
from klstore.store import open_store
from klstore.store.tables import LENS_EVAL_SCHEMA, LENSES_SCHEMA

MODEL = "tiny-a"
SPLIT = "ab" * 32  # held_out_hash
TUNED, LSQ = "89b1c2d3e4f5a6b7", "0123456789abcdef"
# (lens_id, kind) -> per layer 0..5: (kl, top-1 agreement), as the latest fit ("fit-new") wrote them
LOGIT_KL = [8.0, 7.0, 6.0, 4.0, 1.0, 0.0]
NEW = {
    ("logit", "logit"): [(kl, 0.1 * i) for i, kl in enumerate(LOGIT_KL)],
    # below the logit lens at 0-2, within the 0.01 nats at 3, above at 4 and 5 (5: by 0.02)
    (TUNED, "tuned"): [(3.0, 0.5), (2.5, 0.55), (2.0, 0.6), (3.995, 0.62), (1.5, 0.7), (0.02, 0.99)],
    (LSQ, "least_squares"): [(kl + 0.005, 0.2) for kl in LOGIT_KL],  # within the threshold everywhere
}
# an older fit evaluated the tuned lens and the logit lens on the same split: not shown
OLD = {("logit", "logit"): [(9.0, 0.0)] * 6, (TUNED, "tuned"): [(5.0, 0.0)] * 6}


def _spec(**changes):
    return parse_report_spec({"name": "t", "per_prompt": 0, **changes})


def _eval_rows(fit_id, lenses, split=SPLIT, tokens=4096):
    return pa.Table.from_pylist(
        [
            {
                "lens_id": lens_id,
                "lens": kind,
                "layer": layer,
                "kl": kl,
                "top1_agreement": top1,
                "tokens": tokens,
                "held_out_hash": split,
                "fingerprint": "fp",
                "fit_id": fit_id,
            }
            for (lens_id, kind), values in lenses.items()
            for layer, (kl, top1) in enumerate(values)
        ],
        LENS_EVAL_SCHEMA,
    )


def _lens_rows(fit_id, lenses, created):
    return pa.Table.from_pylist(
        [
            {
                "lens_id": lens_id,
                "kind": kind,
                "model_name": "tiny",
                "fingerprint": "fp",
                "held_out_hash": SPLIT,
                "recipe": "{}",
                "tokens": 1000,
                "fit_id": fit_id,
                "created_at": created,
            }
            for lens_id, kind in lenses
            if lens_id != "logit"
        ],
        LENSES_SCHEMA,
    )


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory):
    """One tiny model's kl rows, no lens tables (a store from before lenses)."""
    uri = str(tmp_path_factory.mktemp("lens-report") / "store")
    worker = Worker(MODEL, MODEL, uri, loaded=from_objects(MODEL, build("llama"), ToyTokenizer()))
    job = ComputeSpec((ProbeSpec("logit_lens"),), "all", ("kl",), GenerationSpec(2))
    worker.run_shard("r1", [Prompt("p0", "The quick brown fox", "g"), Prompt("p1", "One two three", "g")], job)
    return uri


@pytest.fixture(scope="module")
def lens_store(plain_store, tmp_path_factory):
    """plain_store plus two fits' `lenses` and `lens_eval` rows (through Store.write: the same
    folders and records a fit writes); the older fit's files are written last."""
    uri = str(tmp_path_factory.mktemp("lens-report") / "store")
    shutil.copytree(plain_store, uri)
    store = open_store(uri)
    new, old = datetime(2025, 2, 1, tzinfo=timezone.utc), datetime(2025, 1, 1, tzinfo=timezone.utc)
    store.write("lenses", _lens_rows("fit-new", NEW, new), "lens-new.parquet", model=MODEL)
    store.write("lens_eval", _eval_rows("fit-new", NEW), "eval-fit-new.parquet", model=MODEL)
    store.write("lenses", _lens_rows("fit-old", OLD, old), "lens-old.parquet", model=MODEL)
    store.write("lens_eval", _eval_rows("fit-old", OLD), "eval-fit-old.parquet", model=MODEL)
    return uri


def _gather(uri, spec=None):
    from klstore.store import views

    con = views.connect(uri)
    spec = spec or _spec()
    where, chosen = aggregate.filters(con, spec)
    return site.gather(con, spec, where, chosen)


def _lenses(report) -> list:
    """(lens figure, its observations) of each of the report's lens views."""
    return [(view.lens, view.observations) for view in report.lenses]


def test_the_figure_and_table_hold_the_latest_evaluation_of_each_lens(lens_store):
    ((figure, _),) = _lenses(_gather(lens_store))
    assert figure.model == MODEL and figure.held_out_hash == SPLIT and figure.tokens == 4096
    assert [c.label for c in figure.curves] == ["logit", "tuned 89b1c2d3\u2026", "least_squares 01234567\u2026"]
    assert {c.fit_id for c in figure.curves} == {"fit-new"}  # not the older fit's evaluation
    expected = {lens_id: values for (lens_id, _), values in NEW.items()}
    for curve in figure.curves:
        assert curve.layers == tuple(range(6))
        np.testing.assert_allclose(curve.kl, [kl for kl, _ in expected[curve.lens_id]], rtol=0, atol=0)
        np.testing.assert_allclose(curve.top1, [t for _, t in expected[curve.lens_id]], rtol=0, atol=0)
    names, rows = figure.table()
    assert names == ["layer"] + [f"{c.label} {w}" for c in figure.curves for w in ("KL", "top-1")]
    assert rows[3] == ["3", "4", "0.300", "3.995", "0.620", "4.005", "0.200"]

    # the matplotlib figure: one line per lens, its y the rows' KL (the logit lens's 0 on the
    # log axis's bottom, with a hollow marker), the logit lens dashed, the labels in the legend
    fig = lineplot.draw(site.lens_lines(figure))
    ax = fig.axes[0]
    lines = {line.get_gid(): line for line in ax.lines}
    for i, curve in enumerate(figure.curves):
        line = lines[f"series-{i}"]
        np.testing.assert_array_equal(line.get_xdata(), range(6))
        np.testing.assert_allclose(line.get_ydata(), np.maximum(curve.kl, LENS_EVAL_FLOOR), rtol=0, atol=0)
        assert (line.get_linestyle() == "--") == curve.is_logit
    for low in ("below-y-min-0", "below-y-min-2"):  # logit 0, least_squares 0.005 at layer 5
        np.testing.assert_array_equal(lines[low].get_xdata(), [5])
    assert set(lines) == {"series-0", "series-1", "series-2", "below-y-min-0", "below-y-min-2"}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [c.label for c in figure.curves]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "Layer" and "KL" in ax.get_ylabel()
    assert ax.get_title().startswith(f"{MODEL} | held-out KL per layer") and "drawn at 0.01" in ax.get_title()

    # the interactive figure: the same numbers, the real value (0) in the hover
    traces = interactive.lines_figure(site.lens_lines(figure))["data"]
    assert [t["name"] for t in traces] == [c.label for c in figure.curves]
    for trace, curve in zip(traces, figure.curves):
        np.testing.assert_allclose(trace["y"], np.maximum(curve.kl, LENS_EVAL_FLOOR))
    assert "layer 5: 0 nats" in traces[0]["customdata"][5] and "drawn at 0.01" in traces[0]["customdata"][5]


def test_the_sentences_name_the_layers_where_a_lens_beats_or_trails_the_logit_lens(lens_store):
    ((_, observations),) = _lenses(_gather(lens_store))
    assert observations == (
        "tuned lens 89b1c2d3\u2026: held-out KL below the logit lens's at layers 0-2 (mean 2.5 vs 7 nats); "
        "above the logit lens's at layers 4-5 (mean 0.76 vs 0.5 nats); within 0.01 nats of it at layer 3.",
        "least_squares lens 01234567\u2026: held-out KL within 0.01 nats of the logit lens's at every layer "
        "both evaluate (layers 0-5).",
        "Differences under 0.01 nats are not counted: lens evaluations have no measured noise floor, "
        "so this fixed threshold stands in for one.",
    )


def test_the_site_shows_the_section_and_redraws_it_when_an_evaluation_is_added(lens_store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(lens_store, copy)
    out = tmp_path / "rep"
    first = site.build(open_store(str(copy)), _spec(), out=out, log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    (fig_id,) = manifest["lenses"]
    entry = manifest["lenses"][fig_id]
    assert [lens["lens_id"] for lens in entry["lenses"]] == ["logit", TUNED, LSQ]
    assert first["drawn"] == len(manifest["figures"]) + 1
    assert (out / entry["png"]).stat().st_size > 1000 and "<svg" in (out / entry["svg"]).read_text()
    index, markdown = (out / "index.html").read_text(), (out / "report.md").read_text()
    assert '<a href="#lenses">Lenses</a>' in index and '<h2 id="lenses">Lenses</h2>' in index
    assert "<td>3.995</td><td>0.620</td>" in index and "layers 0-2 (mean 2.5 vs 7 nats)" in index
    figures = json.loads(index.split('id="klstore-figures">')[1].split("</script>")[0])
    assert figures[fig_id]["data"][1]["y"] == [kl for kl, _ in NEW[(TUNED, "tuned")]]
    assert "\n## Lenses\n" in markdown and f"![{site.md(entry['title'])}](figures/{fig_id}.png)" in markdown
    assert "| 3 | 4 | 0.300 | 3.995 | 0.620 | 4.005 | 0.200 |" in markdown
    again = site.build(open_store(str(copy)), _spec(), out=out, log=lambda m: None)
    assert not again["changed"]
    # a later fit re-evaluates the tuned lens: only the lens figure is redrawn
    later = {(TUNED, "tuned"): [(1.0, 0.9)] * 6, ("logit", "logit"): NEW[("logit", "logit")]}
    store = open_store(str(copy))
    store.write(
        "lenses", _lens_rows("fit-later", later, datetime(2025, 3, 1, tzinfo=timezone.utc)), "l3.parquet", model=MODEL
    )
    store.write("lens_eval", _eval_rows("fit-later", later), "eval-fit-later.parquet", model=MODEL)
    update = site.build(open_store(str(copy)), _spec(), out=out, log=lambda m: None)
    assert update["changed"] and update["drawn"] == 1 and update["reused"] == len(manifest["figures"])
    assert "layers 0-3 (mean 1 vs 6.25 nats)" in (out / "index.html").read_text()


def test_a_store_without_lens_tables_has_no_lens_section(plain_store, tmp_path):
    report = _gather(plain_store)
    assert report.lenses == []
    out = tmp_path / "rep"
    site.build(open_store(plain_store), _spec(), out=out, log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "lenses" not in manifest
    for name in ("index.html", "report.md"):
        text = (out / name).read_text()
        assert "Lenses" not in text and "lens_eval" not in text, name
    assert (out / "report.md").read_text() == site.render_markdown(
        _spec(), report.figures, report.summary, report.floors
    )


def test_a_second_held_out_split_is_its_own_figure_and_models_filter(lens_store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(lens_store, copy)
    other = {("logit", "logit"): [(2.0, 0.5)] * 3}
    open_store(str(copy)).write(
        "lens_eval", _eval_rows("fit-x", other, split="cd" * 32, tokens=10), "x.parquet", model=MODEL
    )
    figures = _lenses(_gather(str(copy)))
    assert [(f.held_out_hash, len(f.curves)) for f, _ in figures] == [(SPLIT, 3), ("cd" * 32, 1)]
    assert figures[1][1] == ("Only the logit lens is evaluated on this held-out split (10 tokens).",)
    assert len({f.fig_id for f, _ in figures}) == 2


HOSTILE_MODEL = "<b>m&'x\""
HOSTILE_ID = "<script>alert(1)</script>"
HOSTILE_KIND = r"$\foo{$"


def test_hostile_model_labels_and_lens_ids_are_escaped(lens_store, tmp_path):
    """A model label only a renamed folder can give, a lens id that is HTML and a kind that is
    broken mathtext: text in index.html, report.md, the figure JSON and the drawn figure."""
    copy = tmp_path / "store"
    shutil.copytree(lens_store, copy)
    folder = copy / "lens_eval" / f"model={HOSTILE_MODEL}"
    folder.mkdir()
    rows = {("logit", "logit"): [(4.0, 0.1), (1.0, 0.5)], (HOSTILE_ID, HOSTILE_KIND): [(2.0, 0.4), (1.0, 0.5)]}
    pq.write_table(_eval_rows("fit-h", rows), folder / "eval.parquet")
    report = _gather(str(copy))
    hostile, observations = next((f, o) for f, o in _lenses(report) if f.model == HOSTILE_MODEL)
    assert hostile.curves[1].label == HOSTILE_KIND + " " + HOSTILE_ID[:8] + "\u2026"
    assert observations[0].startswith(f"{HOSTILE_KIND} lens <script>\u2026: held-out KL below")
    fig = lineplot.draw(site.lens_lines(hostile))
    fig.savefig(io.BytesIO(), format="png")  # mathtext would raise: unknown symbol \foo
    assert fig.axes[0].get_title().startswith(HOSTILE_MODEL)
    out = tmp_path / "rep"
    site.build(open_store(str(copy)), _spec(), out=out, log=lambda m: None)
    index, markdown = (out / "index.html").read_text(), (out / "report.md").read_text()
    assert "<script>alert" not in index and "<b>m" not in index
    assert "<h3>&lt;b&gt;m&amp;&#39;x&#34;</h3>" in index and "&lt;script&gt;\u2026" in index
    assert index.count("<script") == 3  # the figure JSON, plotly.js, report.js
    figures = index.split('id="klstore-figures">')[1].split("</script>")[0]
    assert "<" not in figures and ">" not in figures and "&" not in figures
    trace = json.loads(figures)[hostile.fig_id]["data"][1]
    assert trace["name"] == "$\\foo{$ &lt;script&gt;\u2026"  # plotly text: HTML-escaped
    assert "<script>" not in markdown and "<b>m" not in markdown and "&lt;b&gt;m&amp;" in markdown
