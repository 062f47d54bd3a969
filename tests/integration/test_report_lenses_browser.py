"""The Lenses section in headless Chromium (see test_report_browser.py for the set-up and its
skip): the line figure is drawn by plotly, its hover shows a point's stored numbers, a click
on a point of the enlarged figure (which has no links) raises no error, and a lens id that is
markup stays text."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from test_report_browser import Tab, _draw, _draw_all, _local, browser  # noqa: F401 (fixture)
from test_report_lenses import NEW, _eval_rows, _spec, lens_store, plain_store  # noqa: F401 (fixtures)

from klstore.report import site
from klstore.store import open_store

IMG = "<img src=x onerror=window.__pwned=1>"


@pytest.fixture()
def tab(browser):  # noqa: F811
    opened = Tab(browser)
    yield opened
    assert opened.errors == []
    assert [url for url in opened.requests if not _local(url)] == []
    opened.close()


@pytest.fixture(scope="module")
def built(lens_store, tmp_path_factory):  # noqa: F811
    copy = tmp_path_factory.mktemp("lens-browser") / "store"
    shutil.copytree(lens_store, copy)
    folder = copy / "lens_eval" / "model=tiny-a"
    rows = {("logit", "logit"): NEW[("logit", "logit")], (IMG, "tuned"): [(2.0, 0.4)] * 6}
    pq.write_table(_eval_rows("fit-evil", rows, split="ef" * 32), folder / "evil.parquet")
    out = tmp_path_factory.mktemp("lens-site") / "rep"
    site.build(open_store(str(copy)), _spec(), out=out, log=lambda m: None)
    return out.resolve()


def _point(page, selector: str, x: float, y: float) -> tuple[float, float]:
    """The page coordinates of data point (x, y) of a drawn plot with a log y axis."""
    return page.evaluate(
        """([selector, x, y]) => {
        const gd = document.querySelector(selector);
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, box = gd.getBoundingClientRect();
        return [box.left + xa._offset + xa.c2p(x), box.top + ya._offset + ya.c2p(y)]; }""",
        [selector, x, y],  # c2p takes the data value (it takes the log itself on a log axis)
    )


def test_the_lens_figure_draws_hovers_and_enlarges(built, tab):
    manifest = json.loads((built / "manifest.json").read_text())
    fig_id = next(k for k, f in manifest["lenses"].items() if f["held_out_hash"] != "ef" * 32)
    page = tab.open(built / "index.html")
    assert _draw_all(page) == len(manifest["figures"]) + len(manifest["lenses"])
    _draw(page, f"#{fig_id}")
    x, y = _point(page, f"#{fig_id} .plot", 2, 2.0)  # the tuned lens at layer 2: KL 2.0
    page.mouse.move(x, y)
    page.wait_for_selector(".hoverlayer .hovertext")
    lines = page.evaluate(
        "Array.from(document.querySelectorAll('.hoverlayer .hovertext tspan.line')).map(t => t.textContent)"
    )
    assert lines[:2] == ["tuned 89b1c2d3\u2026", "layer 2: 2 nats"] and lines[2].startswith("top-1 agreement 0.600")
    evil = next(k for k in manifest["lenses"] if k != fig_id)  # the logit lens alone near 7 nats
    _draw(page, f"#{evil}")
    page.click(f"#{evil} .plot")
    page.locator("#zoom .plot[data-drawn]").wait_for()
    page.evaluate(
        "() => { window.__clicked = []; document.querySelector('#zoom .plot')"
        ".on('plotly_click', e => window.__clicked.push(e.points[0].curveNumber)); }"
    )
    x, y = _point(page, "#zoom .plot", 1, 7.0)  # the logit lens (curve 0) at layer 1
    page.mouse.click(x, y)  # no link, no navigation, no error (the tab fixture checks)
    assert page.evaluate("window.__clicked") == [0]
    page.keyboard.press("Escape")
    assert page.locator("#zoom").is_hidden()
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert "tuned <img src\u2026" in page.inner_text("body")  # the hostile id's label, as text
