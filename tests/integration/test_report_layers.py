"""Reports over layer-subset stores, built as a user builds them (site.build), with every
warning an error (issue 25): numpy, pandas and matplotlib warnings must be fixed at their
cause, not reach the user. The static figures (PNG, SVG) show only the stored rows and a break
at each jump; over a full-layer store, `stored` (the default) draws exactly what `all` drew.
(Grids: tests/unit/test_stored_layers.py; in a browser: test_report_layers_browser.py.)"""

from __future__ import annotations

import json
import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from layer_stores import SEED_LAYERS, build_store
from PIL import Image

from klstore.report import plotting, site
from klstore.spec import parse_report_spec
from klstore.store import open_store

SVG = "{http://www.w3.org/2000/svg}"
SUBSET = {"models": ["deep", "half", "union"], "runs": "all", "per_prompt": 2}


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    return build_store(str(tmp_path_factory.mktemp("layers") / "store"))


def _build(uri: str, out: Path, **changes) -> Path:
    """The report of the spec, drawn in this process, with any warning raised as an error."""
    spec = parse_report_spec({"name": "t", **changes})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        site.build(open_store(uri), spec, out=out, log=lambda m: None, workers=1)
    return out.resolve()


def _figure(built: Path, title: str) -> dict:
    figures = json.loads((built / "manifest.json").read_text())["figures"]
    return next(f for f in figures.values() if f["title"] == title)


def _svg_rows(path: Path) -> tuple[list[str], dict]:
    """The y tick labels of a heatmap SVG (top to bottom) with their heights, and the height of
    each break line (by its gid)."""
    root = ET.parse(path).getroot()
    axis = next(g for g in root.iter(f"{SVG}g") if g.get("id") == "matplotlib.axis_2")
    ticks = []
    for tick in (g for g in axis if g.get("id", "").startswith("ytick_")):
        label = "".join(tick.find(f".//{SVG}text").itertext())
        ticks.append((label, float(tick.find(f".//{SVG}use").get("y"))))
    breaks = {}
    for group in (g for g in root.iter(f"{SVG}g") if g.get("id", "").startswith("layer-gap-")):
        heights = {float(y) for y in re.findall(r"[ML] [\d.]+ ([\d.]+)", group.find(f".//{SVG}path").get("d"))}
        assert len(heights) == 1  # horizontal
        breaks[group.get("id")] = heights.pop()
    return ticks, breaks


def _undated(path: Path) -> bytes:
    return re.sub(rb"<dc:date>[^<]*</dc:date>", b"", path.read_bytes())


@pytest.mark.parametrize("layers", ["stored", "all"])
def test_a_subset_store_reports_without_warnings(store_uri, tmp_path, layers):
    """Layers 0, 15-21, 27 of a 28-layer model (and two more models on subsets, runs with
    different subsets): no warning; `stored` draws those 9 rows with a break after 0 and 21,
    `all` the model's 28."""
    built = _build(store_uri, tmp_path / "rep", layers=layers, **SUBSET)
    figure = _figure(built, "deep | logit_lens | mean of 4 prompts")
    n_cols = 3
    rows = SEED_LAYERS if layers == "stored" else tuple(range(28))
    with Image.open(built / figure["png"]) as png:  # the figure's height follows its row count
        width, height = plotting.figure_size(len(rows), n_cols)
        assert png.size == (int(width * plotting.DPI), int(height * plotting.DPI))
    ticks, breaks = _svg_rows(built / figure["svg"])
    assert [label for label, _ in ticks] == [str(k) for k in rows]
    if layers == "stored":  # each break lies half-way between the rows it separates
        y = [height for _, height in ticks]
        assert breaks == {
            "layer-gap-0": pytest.approx((y[0] + y[1]) / 2, abs=0.01),
            "layer-gap-7": pytest.approx((y[7] + y[8]) / 2, abs=0.01),
        }
        assert not any("n/a" in note for note in figure["observations"])
    else:
        assert breaks == {}
    markdown = (built / "report.md").read_text()
    assert f"layers `{layers}`" in markdown


def test_a_full_layer_store_draws_the_same_under_stored_and_all(store_uri, tmp_path):
    """`stored` is the default; over a store with every layer it draws what `all` draws, to the
    byte: every PNG and SVG, every figure's JSON and observations."""
    one = {"models": ["full"], "per_prompt": 2}
    default = _build(store_uri, tmp_path / "default", **one)
    every = _build(store_uri, tmp_path / "all", layers="all", **one)
    assert json.loads((default / "manifest.json").read_text())["spec"]["layers"] == "stored"
    files = sorted(p.relative_to(default) for p in (default / "figures").iterdir())
    assert len(files) == 2 * 6  # PNG and SVG of: overall, 2 groups, their comparison, 2 examples
    assert files == sorted(p.relative_to(every) for p in (every / "figures").iterdir())
    for name in files:  # (an SVG's date, where matplotlib writes one, is when it was drawn)
        assert _undated(default / name) == _undated(every / name), name

    def figures(built: Path) -> dict:
        shown = json.loads((built / "index.html").read_text().split('id="klstore-figures">')[1].split("</script>")[0])
        told = {k: {**f, "key": None} for k, f in json.loads((built / "manifest.json").read_text())["figures"].items()}
        return {"shown": shown, "told": told}

    assert figures(default) == figures(every)
    pages = sorted(p.relative_to(default) for p in (default / "prompts").iterdir())
    assert len(pages) == 4 and all((default / p).read_bytes() == (every / p).read_bytes() for p in pages)
    lines = [(default / "report.md").read_text().splitlines(), (every / "report.md").read_text().splitlines()]
    assert [a for a, b in zip(*lines) if a != b] == ["mean of `kl` (nats); layers `stored`."]
