"""The report in headless Chromium (playwright driving the system's Chromium; no browser download).

One site is built per module from real computed rows: two tiny random Llamas, one with a toy
tokenizer (plain characters, a space among them) and one whose every token text, prompt id,
group and prompt text is HTML that would run script if it were ever parsed as markup.
Pages are opened from file:// URLs; every request is routed and recorded.

Chromium: Debian's `chromium` package (.ci/run installs it). Without it these tests skip,
except under CI (CI=true), where they fail and say what is missing.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from tiny_models import ToyTokenizer, build

from klstore.core.models import from_objects
from klstore.output import visible_token
from klstore.report import site
from klstore.run.worker import Worker
from klstore.spec import ComputeSpec, GenerationSpec, ProbeSpec, Prompt, parse_report_spec
from klstore.store import open_store, views

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCRIPT = "<script>window.__pwned=1</script>"
IMG = "<img src=x onerror=window.__pwned=1>"


class HostileTokenizer(ToyTokenizer):
    """Every token's text is markup that would set window.__pwned if a page ever parsed it."""

    def decode(self, ids):
        return "".join(
            f"<script>window.__pwned={i}</script>" if i % 2 else f"<img src=x onerror=window.__pwned={i}>" for i in ids
        )


def _chromium() -> str:
    """The Chromium executable; a skip (or, under CI, a failure) naming what is missing."""
    path = "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")
    problem = None
    if path is None:
        problem = "chromium is not installed (Debian package `chromium`; .ci/run installs it)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright package is not installed (pip install -e '.[test]')"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"report browser tests need a browser under CI: {problem}")
        pytest.skip(problem)
    return path


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("browser") / "store")
    job = ComputeSpec((ProbeSpec("logit_lens"), ProbeSpec("skip")), "all", ("kl",), GenerationSpec(4))
    plain = [
        Prompt(f"p{i}", text, group)
        for i, (text, group) in enumerate(
            [
                ("The quick brown fox", "animals"),
                ("A lazy dog sleeps", "animals"),
                ("One two three four", "numbers"),
                ("Five six seven", "numbers"),
            ]
        )
    ]
    worker = Worker("tiny-a", "tiny-a", uri, loaded=from_objects("tiny-a", build("llama"), ToyTokenizer()))
    worker.run_shard("r1", plain, job)
    hostile = [Prompt(SCRIPT, f"say {IMG}", IMG), Prompt(IMG, f"say {SCRIPT}", SCRIPT)]
    worker = Worker("evil", "evil", uri, loaded=from_objects("evil", build("llama"), HostileTokenizer()))
    worker.run_shard("r1", hostile, ComputeSpec((ProbeSpec("logit_lens"),), "all", ("kl",), GenerationSpec(3)))
    open_store(uri).write_run("r1", "t", "completed", {}, {})
    return uri


@pytest.fixture(scope="module")
def built(store_uri, tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "rep"
    site.build(open_store(store_uri), parse_report_spec({"name": "t", "per_prompt": 2}), out=out, log=lambda m: None)
    return out.resolve()


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Tab:
    """A page whose every request is recorded (and anything not on this machine aborted),
    with its script errors and dialogs collected."""

    def __init__(self, browser):
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.requests, self.errors = [], []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("dialog", lambda dialog: (self.errors.append(f"dialog: {dialog.message}"), dialog.dismiss()))

    def _route(self, route):
        url = route.request.url
        self.requests.append(url)
        if _local(url):
            route.continue_()
        else:
            route.abort()

    def open(self, path: Path):
        self.page.goto(path.as_uri())
        self.page.wait_for_load_state("load")
        return self.page

    def close(self):
        self.context.close()


def _local(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in ("file", "data", "blob") or parsed.hostname in ("127.0.0.1", "localhost")


@pytest.fixture()
def tab(browser):
    opened = Tab(browser)
    yield opened
    assert opened.errors == []
    assert [url for url in opened.requests if not _local(url)] == []
    opened.close()


def _draw(page, selector: str):
    """Scroll the figure into view and wait until plotly has drawn it; returns its plot element."""
    page.locator(selector).scroll_into_view_if_needed()
    plot = page.locator(f"{selector} .plot[data-drawn]")
    plot.wait_for()
    return plot


def _draw_all(page) -> int:
    """Scroll every figure of the page into view in turn, waiting for each to be drawn."""
    cards = page.locator("[data-fig]:not(#zoom)")
    for i in range(cards.count()):
        cards.nth(i).scroll_into_view_if_needed()
        cards.nth(i).locator(".plot[data-drawn]").wait_for()
    return cards.count()


def _hover(page, plot_selector: str, row: int, col: int) -> list[str]:
    """Move the mouse to cell (row, col) of a drawn heatmap; returns the hover label's lines."""
    x, y = page.evaluate(
        """([selector, r, c]) => {
        const gd = document.querySelector(selector);
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, box = gd.getBoundingClientRect();
        return [box.left + xa._offset + xa.c2p(c), box.top + ya._offset + ya.c2p(r)]; }""",
        [plot_selector, row, col],
    )
    page.mouse.move(1, 1)  # off the figure: the previous label goes
    page.wait_for_selector(".hoverlayer .hovertext", state="detached")
    page.mouse.move(x, y)
    page.wait_for_selector(".hoverlayer .hovertext")
    return page.evaluate(
        "Array.from(document.querySelectorAll('.hoverlayer .hovertext tspan.line')).map(t => t.textContent)"
    )


def _manifest(built: Path) -> dict:
    return json.loads((built / "manifest.json").read_text())


def _prompt_page(built: Path, con, model: str, probe: str, prompt_id: str) -> Path:
    from klstore.report.prompts import prompt_fig_id

    return built / "prompts" / f"{prompt_fig_id(model, probe, prompt_id)}.html"


def test_hovering_a_prompt_cell_shows_the_stored_top_tokens(built, store_uri, tab):
    con = views.connect(store_uri)
    page = tab.open(_prompt_page(built, con, "tiny-a", "logit_lens", "p2"))
    _draw(page, "figure.card")
    checked = 0
    for layer, gen_idx in ((0, 0), (1, 2), (3, 3)):
        lines = _hover(page, "figure.card .plot", layer, gen_idx)
        top = con.execute(
            "SELECT token_text, prob FROM lens_tokens WHERE model = 'tiny-a' AND probe = 'logit_lens' "
            "AND prompt_id = 'p2' AND layer = ? AND gen_idx = ? ORDER BY rank",
            [layer, gen_idx],
        ).fetchall()
        rank, token = con.execute(
            "SELECT k.gen_rank, g.token_text FROM kl k JOIN generations g USING (run_id, model, prompt_id, gen_idx) "
            "WHERE k.model = 'tiny-a' AND k.probe = 'logit_lens' AND k.prompt_id = 'p2' AND k.layer = ? "
            "AND k.gen_idx = ?",
            [layer, gen_idx],
        ).fetchone()
        assert len(top) == 5 and lines[0].startswith(f"layer {layer}, Gen{gen_idx}")
        assert f'1. "{visible_token(top[0][0])}"  {top[0][1]:.3f}' in lines
        assert f'5. "{visible_token(top[4][0])}"  {top[4][1]:.3f}' in lines
        assert any(
            line.startswith(f'generated Gen{gen_idx}: "{visible_token(token)}", rank {rank} under Q') for line in lines
        )
        checked += 1
    assert checked == 3
    assert page.locator("table.lens td.hit").count() > 0  # the top-1 table marks where it is the generated token


def test_hovering_an_aggregate_cell_shows_the_number_of_prompts(built, store_uri, tab):
    con = views.connect(store_uri)
    figures = _manifest(built)["figures"]
    fig_id = next(k for k, f in figures.items() if f["title"] == "tiny-a | skip | mean of 4 prompts")
    page = tab.open(built / "index.html")
    _draw(page, f"#{fig_id}")
    lines = _hover(page, f"#{fig_id} .plot", 2, 1)
    n, mean, median = con.execute(
        "SELECT count(kl), avg(kl), median(kl) FROM kl WHERE model = 'tiny-a' "
        "AND probe = 'skip' AND layer = 2 AND gen_idx = 1"
    ).fetchone()
    assert lines[0] == "layer 2, Gen1" and f"{n} prompts" in lines and n == 4
    assert f"mean {mean:.4g} · median {median:.4g}" in lines
    largest = con.execute(
        "SELECT arg_max(prompt_id, kl) FROM kl WHERE model = 'tiny-a' AND probe = 'skip' AND layer = 2 AND gen_idx = 1"
    ).fetchone()[0]
    assert any(line.startswith("largest ") and line.endswith(f"prompt {largest}") for line in lines)


class _Links(html.parser.HTMLParser):
    """Every href/src of a page, and its element ids."""

    def __init__(self):
        super().__init__()
        self.targets, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for name in ("href", "src"):
            if attrs.get(name):
                self.targets.append(attrs[name])


def _parse(path: Path) -> _Links:
    links = _Links()
    links.feed(path.read_text(encoding="utf-8"))
    return links


def test_every_link_on_every_page_resolves(built):
    pages = [
        built / "index.html",
        *sorted((built / "probes").glob("*.html")),
        *sorted((built / "prompts").glob("*.html")),
    ]
    assert len(pages) == 1 + 3 + 4 * 2 + 2  # index, listings, tiny-a's 4 prompts x 2 probes, evil's 2
    checked = 0
    for path in pages:
        parsed = _parse(path)
        figures = json.loads(path.read_text().split('id="klstore-figures">')[1].split("</script>")[0])
        clicks = [link for figure in figures.values() for row in figure["links"] for link in row if link]
        root = "../" if path.parent != built else ""
        for target in parsed.targets + [root + link for link in clicks]:
            parts = urlparse(target)
            assert parts.scheme == "" and parts.netloc == "", f"{path.name}: {target} leaves the site"
            file = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            assert file.is_file() and built in file.parents, f"{path.name}: {target} does not resolve"
            if parts.fragment:
                assert parts.fragment in _parse(file).ids, f"{path.name}: no #{parts.fragment} in {file.name}"
            checked += 1
    assert checked > 100


def test_a_click_enlarges_a_figure_and_a_cell_opens_its_prompt(built, tab):
    figures = _manifest(built)["figures"]
    fig_id = next(k for k, f in figures.items() if f["title"] == "tiny-a | logit_lens | mean of 4 prompts")
    page = tab.open(built / "index.html")
    small = _draw(page, f"#{fig_id}").bounding_box()
    page.click(f"#{fig_id} .plot")
    zoom = page.locator("#zoom .plot[data-drawn]")
    zoom.wait_for()
    big = zoom.bounding_box()
    assert page.locator("#zoom").get_attribute("data-fig") == fig_id
    assert big["width"] > 2 * small["width"] and big["height"] > 1.5 * small["height"]
    target = page.evaluate(
        f"JSON.parse(document.getElementById('klstore-figures').textContent)[{json.dumps(fig_id)}].links[1][2]"
    )
    x, y = page.evaluate("""() => { const gd = document.querySelector('#zoom .plot');
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, box = gd.getBoundingClientRect();
        return [box.left + xa._offset + xa.c2p(2), box.top + ya._offset + ya.c2p(1)]; }""")
    with page.expect_navigation():
        page.mouse.click(x, y)
    assert target and page.url == (built / target).as_uri()
    page.go_back()
    page.wait_for_load_state("load")
    assert page.locator("#zoom").is_hidden()


def test_no_request_leaves_the_machine(built, tab):
    """Every page and every figure drawn, every request recorded: all are files of the site."""
    page = tab.open(built / "index.html")
    assert _draw_all(page) == len(_manifest(built)["figures"])
    for path in [*(built / "probes").glob("*.html"), *(built / "prompts").glob("*.html")][:4]:
        _draw_all(tab.open(path))
    files = [url for url in tab.requests if url.startswith("file://")]
    assert any(url.endswith("/assets/plotly.min.js") for url in files)
    assert all(Path(unquote(urlparse(url).path)).resolve().is_relative_to(built) for url in files)
    assert [url for url in tab.requests if not url.startswith(("file://", "data:", "blob:"))] == []


def test_script_in_tokens_prompts_and_groups_stays_inert(built, store_uri, tab):
    """Markup in token texts, prompt ids, groups and texts is shown as text on every page, in
    hover labels and in report.md, and never runs."""
    pages = [built / "index.html", *(built / "probes").glob("*.html"), *(built / "prompts").glob("*.html")]
    evil_prompts = [p for p in (built / "prompts").glob("*.html") if "evil" in p.name]
    assert len(evil_prompts) == 2
    shown = ""
    for path in pages:
        page = tab.open(path)
        _draw_all(page)
        assert page.evaluate("typeof window.__pwned") == "undefined", path.name
        assert page.evaluate("document.querySelectorAll('body script:not([src]):not([type])').length") == 0
        assert page.evaluate("document.querySelectorAll('img[onerror], [src=x]').length") == 0
        shown += page.inner_text("body")
    assert SCRIPT in shown and IMG in shown  # the prompt ids, groups and texts, as text
    assert re.search(r"<script>window\.__pwned=\d+</script>", shown.replace(SCRIPT, ""))  # token texts
    assert re.search(r"<img\u2423src=x\u2423onerror=window\.__pwned=\d+>", shown)  # spaces made visible
    page = tab.open(evil_prompts[0])  # a token's hover label and the lens table
    _draw(page, "figure.card")
    lines = _hover(page, "figure.card .plot", 0, 0)
    assert any("window.__pwned=" in line and ("<script>" in line or "<img" in line) for line in lines)
    assert page.locator("table.lens td code").first.inner_text().startswith(("<script>", "<img"))
    page.click("figure.card .plot")
    page.locator("#zoom .plot[data-drawn]").wait_for()
    assert page.evaluate("typeof window.__pwned") == "undefined"
    markdown = (built / "report.md").read_text()
    assert "<script" not in markdown and "<img" not in markdown and "&lt;script&gt;window.\\_\\_pwned=1" in markdown
