"""A layer-subset store's report in headless Chromium (issue 25; see test_report_browser.py for
the set-up and its skip): a store on layers 0, 15-21 and 27 of a 28-layer model gives maps
with exactly those rows, and each jump in the layer numbers is a visible line between the two
rows, read from what plotly drew (tick labels and shapes in the page's SVG), not from the JSON."""

from __future__ import annotations

import json

import pytest
from layer_stores import SEED_LAYERS, build_store
from test_report_browser import Tab, _draw, _hover, _local, browser  # noqa: F401 (fixture)

from klstore.report import site
from klstore.report.plotting import GAP_COLOUR
from klstore.report.prompts import prompt_fig_id
from klstore.spec import parse_report_spec
from klstore.store import open_store


@pytest.fixture()
def tab(browser):  # noqa: F811
    opened = Tab(browser)
    yield opened
    assert opened.errors == []
    assert [url for url in opened.requests if not _local(url)] == []
    opened.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    uri = build_store(str(tmp_path_factory.mktemp("layers-browser") / "store"))
    out = tmp_path_factory.mktemp("layers-site") / "rep"
    spec = parse_report_spec({"name": "t", "models": ["deep", "union"], "runs": "all", "per_prompt": 1})
    site.build(open_store(uri), spec, out=out, log=lambda m: None)  # the default layers: stored
    return out.resolve()


def _fig_id(built, title: str) -> str:
    figures = json.loads((built / "manifest.json").read_text())["figures"]
    return next(k for k, f in figures.items() if f["title"] == title)


def _drawn_rows(page, plot: str) -> tuple[list[str], list[float], list[dict]]:
    """What plotly drew: the y tick labels top to bottom with their vertical centres, and each
    shape line's vertical centre, stroke colour and width, and its length over the map's width."""
    return page.evaluate(
        """(plot) => {
        const gd = document.querySelector(plot);
        const centre = (el) => { const b = el.getBoundingClientRect(); return b.top + b.height / 2; };
        const ticks = Array.from(gd.querySelectorAll('.yaxislayer-above .ytick text'))
            .map(t => [t.textContent, centre(t)]).sort((a, b) => a[1] - b[1]);
        const lines = Array.from(gd.querySelectorAll('.shapelayer path')).map(p => ({
            y: centre(p), stroke: getComputedStyle(p).stroke, width: parseFloat(getComputedStyle(p).strokeWidth),
            across: p.getBoundingClientRect().width }));
        const map = gd.querySelector('.heatmaplayer image').getBoundingClientRect().width;  // the cells
        return [ticks.map(t => t[0]), ticks.map(t => t[1]), lines.map(l => ({...l, across: l.across / map}))];
        }""",
        plot,
    )


def _check_rows(page, plot: str, labels: list[str], gaps: list[int]) -> None:
    """The drawn rows are `labels`, and a dark line lies between rows r and r + 1 for each r in gaps."""
    shown, centres, lines = _drawn_rows(page, plot)
    assert shown == labels
    assert len(lines) == len(gaps)
    for line, r in zip(sorted(lines, key=lambda item: item["y"]), gaps):
        assert line["y"] == pytest.approx((centres[r] + centres[r + 1]) / 2, abs=1.5)
        assert line["stroke"] == "rgb({}, {}, {})".format(*(int(GAP_COLOUR[i : i + 2], 16) for i in (1, 3, 5)))
        assert line["width"] >= 2 and line["across"] == pytest.approx(1.0, abs=0.02)  # the map's full width


def test_a_subset_map_has_exactly_the_stored_rows_and_a_visible_gap(built, tab):
    fig_id = _fig_id(built, "deep | logit_lens | mean of 4 prompts")
    page = tab.open(built / "index.html")
    _draw(page, f"#{fig_id}")
    labels = [str(k) for k in SEED_LAYERS]
    _check_rows(page, f"#{fig_id} .plot", labels, [0, 7])  # 0 | 15 and 21 | 27
    assert _hover(page, f"#{fig_id} .plot", 8, 0)[0] == "layer 27, Gen0"
    assert _hover(page, f"#{fig_id} .plot", 1, 2)[0] == "layer 15, Gen2"
    assert "n/a" not in page.locator(f"#{fig_id} .plot").inner_text()
    page.click(f"#{fig_id} .plot")  # enlarged: the same rows and lines
    page.locator("#zoom .plot[data-drawn]").wait_for()
    _check_rows(page, "#zoom .plot", labels, [0, 7])


def test_prompt_pages_and_comparisons_show_their_stored_rows(built, tab):
    page = tab.open(built / "prompts" / f"{prompt_fig_id('deep', 'logit_lens', 'p2')}.html")
    _draw(page, "figure.card")
    _check_rows(page, "figure.card .plot", [str(k) for k in SEED_LAYERS], [0, 7])
    assert page.locator("table.lens tr:has(td) th").all_inner_texts() == [str(k) for k in SEED_LAYERS]  # tokens
    fig_id = _fig_id(built, "deep minus union | logit_lens | mean")  # rows stored on both sides
    page = tab.open(built / "index.html")
    _draw(page, f"#{fig_id}")
    _check_rows(page, f"#{fig_id} .plot", ["0", "15", "16", "17", "27"], [0, 3])
    union = _fig_id(built, "union | logit_lens | mean of 4 prompts")  # two runs: the union of their layers
    _draw(page, f"#{union}")
    _check_rows(page, f"#{union} .plot", ["0", "15", "16", "17", "26", "27"], [0, 3])
    lines = _hover(page, f"#{union} .plot", 3, 0)  # layer 17: both runs' prompts; layer 0: u1's
    assert lines[0] == "layer 17, Gen0" and "4 prompts" in lines
    assert "2 prompts" in _hover(page, f"#{union} .plot", 0, 0)
