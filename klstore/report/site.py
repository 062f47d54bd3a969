"""Figures -> a static, self-contained site: interactive figures, PNG/SVG, pages per prompt,
index.html, report.md and manifest.json, published atomically.

`build` filters and aggregates (klstore.report.aggregate), reads settling depths
(klstore.report.settling) and per-prompt maps with their lens tokens (klstore.report.prompts),
all immutable grids (klstore.report.grid); makes each grid's klstore.report.figure.Figure (its
colour scale, klstore.report.scale, and noise floor, klstore.report.floor: the cells below it
are marked) with its observations (klstore.report.observe); draws PNG + SVG in parallel
processes (klstore.report.drawing) and the interactive figures' JSON
(klstore.report.interactive) into a fresh build folder:

    index.html                    summary, every figure in a grid, each enlarged on click; where
                                  the store has lens evaluations, a Lenses section (report.lenses)
    probes/<model, probe>.html    every prompt with its settling depths, linking its map
    prompts/<prompt>.html         one prompt's interactive map and its logit-lens token table
    figures/<figure>.png|svg      matplotlib figures for papers (report.md embeds the PNGs)
    assets/                       plotly.min.js (offline bundle, once), report.js, report.css
    report.md, manifest.json

A figure whose inputs (spec, partition files, shared scale) are unchanged is copied from the
previous build instead of redrawn; when no input changed at all, nothing is built. Pages are
rendered from the jinja2 templates in templates/: HTML with autoescaping, Markdown through
the `md` filter (user strings can become neither live HTML nor links), figure JSON through
interactive.script_json. The output path is a symlink swapped atomically to the new build,
so a reader never sees a half-built report. This module never imports torch.
"""

from __future__ import annotations

import hashlib
import html
import itertools
import json
import os
import re
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

from klstore.config import write_problem
from klstore.errors import KlstoreError
from klstore.report import aggregate, drawing, floor, interactive, intervals, lenses, prompts, settling
from klstore.report.figure import Figure, LensView, frame, shared_scales
from klstore.report.grid import Grid, shown_token
from klstore.report.observe import lens_sentences, observe
from klstore.spec import ReportSpec

SITE_VERSION = 3  # part of every cache key: a new site layout redraws everything once
ASSETS = ("report.js", "report.css")  # from templates/, copied into assets/ with plotly.min.js


# -------------------------------------------------------------------- build
def default_out(store, spec: ReportSpec) -> Path:
    if store.is_local:
        return Path(store.root) / "reports" / spec.name
    return Path("klstore-reports") / spec.name


def build(
    store, spec: ReportSpec, out: Path | None = None, force: bool = False, log=print, workers: int | None = None
) -> dict:
    """Build (or update) the report; returns {'index', 'drawn', 'reused', 'seconds', 'changed'}
    and, when it built, 'cpu_seconds': {'main': this process's work but drawing, 'drawing': the figures'}.
    `workers`: drawing processes (None: one per available CPU; 1: draw in this process).
    A store that cannot be read (a corrupt file) is one KlstoreError naming the problem."""
    import duckdb

    from klstore.errors import first_line

    try:
        return _build_or_reuse(store, spec, out, force, log, workers)
    except duckdb.Error as exc:
        message = first_line(exc)
        hint = "" if "verify" in message else "; run `klstore verify` to check the store's files"
        raise KlstoreError(f"cannot read the store for the report: {message}{hint}") from None


def _build_or_reuse(store, spec: ReportSpec, out, force: bool, log, workers) -> dict:
    from klstore.store import views as query

    start = time.perf_counter()
    out = Path(out) if out else default_out(store, spec)
    out = out.absolute()
    if out.exists() and not out.is_symlink():
        raise KlstoreError(
            f"report output {out} exists and is not a klstore report (a symlink to a build); choose another --out"
        )
    builds = out.parent / f".{out.name}.builds"
    con = query.connect(store)
    where, chosen = aggregate.filters(con, spec)  # a spec that matches nothing fails before anything is written
    created = not builds.exists()
    try:
        builds.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KlstoreError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    problem = write_problem(builds)
    if problem is not None:
        raise KlstoreError(f"cannot write the report to {out}: folder {builds} {problem}")
    try:
        return _build(store, spec, out, builds, con, where, chosen, force, log, start, workers)
    except BaseException:
        if created:  # a failed first build leaves no empty .builds folder behind
            shutil.rmtree(builds, ignore_errors=True)
        raise


class Report:
    """What one build shows: the index's figures, every prompt page's figure, the listings, and
    the lens figures (none when the store has no lens evaluations)."""

    def __init__(self, figures, pages, listings, summary, floors=None, lens_views=()):
        self.figures, self.pages, self.listings, self.summary = figures, pages, listings, summary
        self.floors = floors or floor.Floors({})  # the noise floor of each (model, run) shown
        self.lenses = list(lens_views)  # figure.LensView: a lens figure with its observations
        self.prompt_pages = {
            (f.grid.labels["model"], f.grid.labels["run_id"], f.grid.labels["prompt_id"]): f.page for f in pages
        }


def gather(
    con, spec: ReportSpec, where, chosen, on_figures=lambda figures: None, floors: floor.Floors | None = None
) -> Report:
    """Every figure, page and listing of the report: the grids (aggregate, prompts) with their
    settling (settling), scales and noise floors (figure.frame) and observations (observe).
    `on_figures(figures)` gets the index's figures as soon as their numbers, scales and floors
    are known (aggregates and differences first, then the per-prompt examples), so that drawing
    them can start while the rest is read. `floors`: the runs' noise floors (floor.load; read
    here when not given)."""
    floors = floors if floors is not None else floor.load(con, chosen["selection"])
    n_layers = aggregate.layer_counts(con, where)
    grids = aggregate.collect(con, spec, where, n_layers)
    shared = shared_scales(spec, grids)
    index = [frame(grid, spec, floors, shared) for grid in grids]
    on_figures(index)
    settling.load(con, chosen["selection"])
    listings = prompts.listings(con)
    page_grids, examples, page_of = [], [], {}
    for k, listing in enumerate(listings):
        mine = prompts.grids(con, spec, where, n_layers, listing)
        by_id = {g.fig_id: g for g in mine}
        page_grids += mine
        page_of.update(listing.pages())
        examples += [
            by_id[f]
            for f in (
                prompts.prompt_fig_id(listing.model, listing.probe, r.prompt_id)
                for r in listing.examples(spec.per_prompt, k)
            )
            if f in by_id
        ]
    example_scales = shared_scales(spec, examples)
    shown = [frame(g, spec, floors, example_scales, page_of.get(g.fig_id)) for g in examples]
    shared.update(example_scales)
    on_figures(shown)
    index += shown
    settled = settling.attach(con, [f.grid for f in index])
    figures = [_observed(f.with_grid(grid)) for f, grid in zip(index, settled)]
    observed = {f.grid.fig_id: f for f in figures if f.grid.kind == "prompt"}  # the examples
    pages = [  # a page not in the index: its own scale, or its section's
        observed.get(g.fig_id) or _observed(frame(g, spec, floors, shared, page_of.get(g.fig_id))) for g in page_grids
    ]
    lens_views = [LensView(f, tuple(lens_sentences(f))) for f in lenses.load(con, spec.models)]
    summary = _with_floors(aggregate.summary(con, spec, where), floors)
    return Report(figures, pages, listings, summary, floors, lens_views)


def _observed(figure: Figure) -> Figure:
    """The figure with its observations (klstore.report.observe)."""
    return figure.with_observations(observe(figure))


def _interval_entry(shown: Figure) -> dict:
    """A difference figure's manifest entry on its intervals: how they were made and how many
    cells are differences (klstore.report.intervals.differences); nothing for other figures."""
    ci = shown.grid.interval
    if ci is None:
        return {}
    marked = intervals.differences(shown.grid.values, ci, shown.noise_floor)
    return {
        "interval": {
            "level": ci.level,
            "resamples": ci.resamples,
            "seed": ci.seed,
            "paired": ci.paired,
            "statistic": ci.statistic,
            "prompts": [ci.n_a, ci.n_b],
            "differences": int(marked.sum()),
        }
    }


DIFFERENCE_COLUMNS = (
    "comparison",
    "model",
    "probe",
    "a",
    "b",
    "layer",
    "depth",
    "gen_idx",
    "difference",
    "low",
    "high",
    "level",
    "paired",
    "noise_floor",
    "is_difference",
    "figure",
)


def differences(con, spec: ReportSpec) -> list[dict]:
    """The numbers of the report's comparison maps, one dict per cell: what `StoreReader.differences`
    returns (the same grids, floors and intervals as `build`; no figure is drawn)."""
    where, chosen = aggregate.filters(con, spec)
    grids = [g for g in aggregate.collect(con, spec, where) if g.kind == "difference"]
    floors = floor.load(con, chosen["selection"])
    rows = []
    for g in grids:
        ci = g.interval
        noise_floor = floor.for_grid(g, floors)
        marked = intervals.differences(g.values, ci, noise_floor)
        kind = "groups" if "model" in g.labels else "models"
        for r, layer in enumerate(g.layers):
            for c in range(g.values.shape[1]):
                rows.append(
                    {
                        "comparison": kind,
                        "model": g.labels.get("model"),
                        "probe": g.labels["probe"],
                        "a": g.labels["a"],
                        "b": g.labels["b"],
                        "layer": layer if g.ylabel == "Layer" else None,
                        "depth": None if g.ylabel == "Layer" else layer,  # across depths (aggregate)
                        "gen_idx": c,
                        "difference": float(g.values[r, c]),
                        "low": None if ci is None else float(ci.low[r, c]),
                        "high": None if ci is None else float(ci.high[r, c]),
                        "level": None if ci is None else ci.level,
                        "paired": None if ci is None else ci.paired,
                        "noise_floor": noise_floor,
                        "is_difference": bool(marked[r, c]),
                        "figure": g.fig_id,
                    }
                )
    return rows


def _with_floors(summary, floors: floor.Floors):
    """The summary table with a column for each row's model's noise floor."""
    names, rows = summary
    per_model = floors.per_model()
    return names + ["noise floor"], [(*row, floor.text(per_model.get(str(row[0]), (None,))[0])) for row in rows]


def _build(store, spec, out, builds, con, where, chosen, force, log, start, workers) -> dict:
    from klstore import __version__

    previous = out.resolve() if out.is_symlink() else None
    old_manifest = {}
    if previous and (previous / "manifest.json").exists():
        old_manifest = json.loads((previous / "manifest.json").read_text())
    stats = _input_stats(store, chosen.get("runs"))
    floors = floor.load(con, chosen["selection"])  # a floor recorded later (a shard's, a run's) redraws
    inputs = [SITE_VERSION, spec.describe(), sorted((f"{k}", v) for k, v in stats.items()), floors.key()]
    lens_stats = _lens_input_stats(store)
    if lens_stats:  # only then: a store without lens tables keeps its inputs hash
        inputs.append(lens_stats)
    all_inputs = hashlib.sha256(json.dumps(inputs, default=str).encode()).hexdigest()
    if not force and old_manifest.get("inputs_sha256") == all_inputs:
        log(f"report {spec.name}: inputs unchanged, nothing to redraw")
        return {
            "index": out / "index.html",
            "drawn": 0,
            "reused": len(old_manifest.get("figures", {})),
            "seconds": time.perf_counter() - start,
            "changed": False,
        }
    build_dir = builds / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    for folder in ("figures", "assets", "probes", "prompts"):
        (build_dir / folder).mkdir(parents=True)
    keys: dict = {}
    reused = 0

    def reuse(old: dict | None, key: str, png: str, svg: str) -> bool:
        """Copy a figure from the previous build when its inputs are unchanged (its manifest
        `key`) and both its files are there; False when it must be drawn."""
        nonlocal reused
        if force or not old or old.get("key") != key or previous is None:
            return False
        if not ((previous / png).exists() and (previous / svg).exists()):
            return False
        shutil.copy2(previous / png, build_dir / png)
        shutil.copy2(previous / svg, build_dir / svg)
        reused += 1
        return True

    def draw_or_reuse(figures):  # called by gather as soon as the figures' numbers and scales are known
        jobs = []
        for shown in figures:
            grid = shown.grid
            extra = json.dumps([report_shared(shown), shown.noise_floor])
            key = keys[grid.fig_id] = _figure_key(spec, grid, stats, extra)
            png, svg = f"figures/{grid.fig_id}.png", f"figures/{grid.fig_id}.svg"
            if not reuse(old_manifest.get("figures", {}).get(grid.fig_id), key, png, svg):
                jobs.append(drawing.DrawJob(heatmap_data(shown), (str(build_dir / png), str(build_dir / svg))))
        drawer.submit(jobs)

    def report_shared(shown):
        scale = shown.scale
        return [scale.lo, scale.hi] if spec.shared_scale and scale is not None else None

    lens_keys: dict = {}

    def draw_or_reuse_lenses(views):
        jobs = []
        for view in views:
            lens = view.lens
            key = lens_keys[lens.fig_id] = hashlib.sha256(
                json.dumps([SITE_VERSION, lens.fig_id, lens_key(lens)]).encode()
            ).hexdigest()
            png, svg = f"figures/{lens.fig_id}.png", f"figures/{lens.fig_id}.svg"
            if not reuse(old_manifest.get("lenses", {}).get(lens.fig_id), key, png, svg):
                jobs.append(drawing.DrawJob(lens_lines(lens), (str(build_dir / png), str(build_dir / svg))))
        drawer.submit(jobs)

    main_cpu = time.process_time()
    with drawing.Drawer(workers) as drawer:  # its processes start while the queries run
        report = gather(con, spec, where, chosen, on_figures=draw_or_reuse, floors=floors)
        draw_or_reuse_lenses(report.lenses)
        _write_site(build_dir, spec, store, report)  # while the figures are drawn
        drawn = drawer.wait()
        if drawer.broken:
            log(
                "report: the drawing processes died (a script calling the report must keep its code under "
                '`if __name__ == "__main__":`); drew the figures in this process instead'
            )
    figures = {
        f.grid.fig_id: {
            "key": keys[f.grid.fig_id],
            "png": f"figures/{f.grid.fig_id}.png",
            "svg": f"figures/{f.grid.fig_id}.svg",
            "title": f.grid.title,
            "section": f.grid.section,
            "observations": list(f.observations),
            "noise_floor": f.noise_floor,
            "below_noise_floor": int(f.below_floor.sum()),
            **_interval_entry(f),
            "inputs": [list(i) for i in f.grid.inputs],
        }
        for f in report.figures
    }
    manifest = {
        "report": spec.name,
        "spec": spec.describe(),
        "spec_source": spec.source,
        "store": store.uri,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "klstore_version": __version__,
        "inputs_sha256": all_inputs,
        "input_files": {f"{m}/{p}": files for (m, p), files in sorted(stats.items(), key=str)},
        "noise_floor": {model: value for model, (value, _, _) in floors.per_model().items()},
        "figures": figures,
        "pages": {"probes": [listing.page for listing in report.listings], "prompts": len(report.pages)},
    }
    if report.lenses:  # the key only where the store has lens evaluations
        manifest["lenses"] = {
            v.lens.fig_id: {
                "key": lens_keys[v.lens.fig_id],
                "png": f"figures/{v.lens.fig_id}.png",
                "svg": f"figures/{v.lens.fig_id}.svg",
                "title": v.lens.title,
                "model": v.lens.model,
                "held_out_hash": v.lens.held_out_hash,
                "threshold_nats": floor.LENS_EVAL_FLOOR,
                "lenses": [{"kind": c.kind, "lens_id": c.lens_id, "fit_id": c.fit_id} for c in v.lens.curves],
                "observations": list(v.observations),
            }
            for v in report.lenses
        }
    (build_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    _publish(build_dir, out)
    for old_build in builds.iterdir():
        if old_build.is_dir() and old_build != build_dir:
            shutil.rmtree(old_build, ignore_errors=True)
    seconds = time.perf_counter() - start
    log(
        f"report {spec.name}: {len(report.figures) + len(report.lenses)} figures ({drawn} drawn, {reused} unchanged), "
        f"{len(report.pages)} prompt pages in {seconds:.1f} s"
    )
    return {
        "index": out / "index.html",
        "drawn": drawn,
        "reused": reused,
        "seconds": seconds,
        "changed": True,
        "cpu_seconds": {"main": time.process_time() - main_cpu - drawer.local_seconds, "drawing": drawer.cpu_seconds},
    }


def _write_site(build_dir: Path, spec: ReportSpec, store, report: Report) -> None:
    """index.html, the listing and prompt pages, report.md and the assets."""
    env = _environment(autoescape=True)
    _copy_assets(build_dir / "assets")
    (build_dir / "index.html").write_text(render_html(spec, report, store.uri, env), encoding="utf-8")
    by_probe: dict = {}
    for page in report.pages:
        by_probe.setdefault((page.grid.labels["model"], page.grid.labels["probe"]), []).append(page)
    for listing in report.listings:
        (build_dir / listing.page).write_text(
            env.get_template("probe.html.j2").render(spec=spec, listing=listing, root="../", figures=_figures_json({})),
            encoding="utf-8",
        )
        for page in by_probe.get((listing.model, listing.probe), []):
            (build_dir / page.page).write_text(
                render_prompt_page(env, spec, page, listing, report.prompt_pages), encoding="utf-8"
            )
    (build_dir / "report.md").write_text(
        render_markdown(spec, report.figures, report.summary, report.floors, report.lenses), encoding="utf-8"
    )


def render_prompt_page(env, spec: ReportSpec, page: Figure, listing, pages: dict) -> str:
    """prompts/<prompt>.html: the prompt's interactive map, observations and logit-lens table."""
    grid = page.grid
    return env.get_template("prompt.html.j2").render(
        spec=spec,
        grid=grid,
        figure=page,
        listing=listing,
        root="../",
        shown=shown_token,
        lens=_lens_table(grid),
        figures=_figures_json({grid.fig_id: interactive.figure(page, pages)}),
    )


def _copy_assets(folder: Path) -> None:
    """plotly.js's offline bundle (from the plotly package) and the report's own JS and CSS."""
    from importlib.resources import files

    bundle = files("plotly") / "package_data" / "plotly.min.js"
    with bundle.open("rb") as source, open(folder / "plotly.min.js", "wb") as target:
        shutil.copyfileobj(source, target)
    templates = files("klstore.report") / "templates"
    for name in ASSETS:
        (folder / name).write_bytes((templates / name).read_bytes())


def _figures_json(figures: dict):
    """Figure JSON for a `<script type="application/json">` element (escaped by script_json)."""
    from markupsafe import Markup

    return Markup(interactive.script_json(figures))


def _lens_table(grid: Grid) -> list:
    """Rows of the logit-lens token table: (layer, [(top-1 text, its probability, top-1 is the
    generated token, the top-k as one line)] per generated token)."""
    topk = grid.hover.get("topk")
    if topk is None or not any(cell for cell in topk.flat):
        return []
    match = grid.hover["top1_match"]  # set with topk (prompts._grid)
    rows = []
    for r, layer in enumerate(grid.layers):
        cells = []
        for c in range(topk.shape[1]):
            tokens = topk[r, c] or []
            first = tokens[0] if tokens else (None, float("nan"))
            listed = "  ".join(f"{i}. {shown_token(t)} {p:.3f}" for i, (t, p) in enumerate(tokens, 1))
            cells.append((shown_token(first[0]) if tokens else "", first[1], bool(match[r, c]), listed))
        rows.append((layer, cells))
    return rows


def _input_stats(store, chosen_runs) -> dict:
    """(model, probe) -> sorted (path, SHA-256) of the kl files a figure reads: the hash from the
    file's record (written with the file), or computed when it has none. A redone shard or a
    compaction changes it; nothing else does (no sizes or times, which S3 does not keep)."""
    from klstore.store.integrity import file_sha256, read_record, visible

    stats: dict = {}
    root = store.root.rstrip("/") + "/"
    for path in visible(store, "kl"):
        parts = dict(p.split("=", 1) for p in path.split("/") if "=" in p)
        if chosen_runs is not None and parts.get("run_id") not in chosen_runs:
            continue
        record = read_record(store, path) or {}
        digest = record.get("sha256") or file_sha256(store, path)
        relative = path[len(root) :] if path.startswith(root) else path
        stats.setdefault((parts.get("model"), parts.get("probe")), []).append((relative, digest))
    return {key: sorted(files) for key, files in stats.items()}


def _lens_input_stats(store) -> list:
    """Sorted (path, SHA-256) of the `lenses` and `lens_eval` files (empty for a store without
    lens tables): a new evaluation or fit changes it."""
    from klstore.store.integrity import file_sha256, read_record, visible

    root = store.root.rstrip("/") + "/"
    out = []
    for table in ("lenses", "lens_eval"):
        for path in visible(store, table):
            digest = (read_record(store, path) or {}).get("sha256") or file_sha256(store, path)
            out.append((path[len(root) :] if path.startswith(root) else path, digest))
    return sorted(out)


def _figure_key(spec: ReportSpec, grid: Grid, stats: dict, extra: str) -> str:
    """Changes whenever anything the figure is drawn from changes."""
    digest = hashlib.sha256()
    digest.update(json.dumps(spec.describe(), sort_keys=True, default=str).encode())
    digest.update(grid.fig_id.encode())
    digest.update(extra.encode())
    for model, probe in grid.inputs:
        for key in sorted(stats):
            if key[0] == model and (probe is None or key[1] == probe):
                digest.update(json.dumps(sorted(stats[key])).encode())
    return digest.hexdigest()


def _publish(build_dir: Path, out: Path) -> None:
    """Point `out` at the new build with one atomic rename of a symlink."""
    link = out.parent / f".{out.name}.link-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.relpath(build_dir, out.parent), link)
    os.replace(link, out)


def heatmap_data(shown: Figure):
    """The plain value a figure's heatmap is drawn from (differences on a diverging map, no counts)."""
    from klstore.report.plotting import DIVERGENCE_LABELS, HeatmapData

    grid = shown.grid
    label = DIVERGENCE_LABELS.get(grid.divergence, grid.divergence)
    if grid.kind == "difference":
        return HeatmapData(
            grid.values,
            grid.layers,
            grid.columns,
            grid.title,
            grid.divergence,
            counts=None,
            cmap="RdBu_r",
            colorbar_label=f"Difference in {label}",
            ylabel=grid.ylabel,
            scale=shown.scale,
            noise_floor=shown.noise_floor,
            below_floor=shown.below_floor,
            gaps=grid.gaps,
            unsure=intervals.unsure(grid.values, grid.interval),
            level=None if grid.interval is None else grid.interval.level,
        )
    return HeatmapData(
        grid.values,
        grid.layers,
        grid.columns,
        grid.title,
        grid.divergence,
        counts=grid.counts if grid.kind == "aggregate" else None,
        ylabel=grid.ylabel,
        scale=shown.scale,
        noise_floor=shown.noise_floor,
        below_floor=shown.below_floor,
        gaps=grid.gaps,
    )


LENS_YLABEL = f"Held-out KL(final \u2016 lens) ({floor.UNIT})"


def lens_lines(lens: lenses.LensFigure):
    """The plain value a lens figure is drawn from (klstore.report.lineplot): one line per lens,
    the logit lens dashed, on a log axis whose bottom is floor.LENS_EVAL_FLOOR."""
    from klstore.report.lineplot import LinesData, Series

    series = []
    for curve in lens.curves:
        hover = tuple(
            f"top-1 agreement {lenses.number_text(t, '{:.3f}')} \u00b7 {curve.tokens} tokens" for t in curve.top1
        )
        series.append(Series(curve.label, curve.layers, curve.kl, dashed=curve.is_logit, hover=hover))
    return LinesData(lens.title, tuple(series), "Layer", LENS_YLABEL, log_y=True, y_min=floor.LENS_EVAL_FLOOR)


def lens_key(lens: lenses.LensFigure) -> list:
    """A JSON-able form of everything a lens figure is drawn from (its cache key)."""
    return [
        lens.title,
        floor.LENS_EVAL_FLOOR,
        [[c.kind, c.lens_id, c.fit_id, list(c.layers), _listed(c.kl), _listed(c.top1), c.tokens] for c in lens.curves],
    ]


def _listed(values) -> list:
    return [float(v) if np.isfinite(v) else None for v in values]


# ------------------------------------------------------------------- render
def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


_MD_PUNCTUATION = re.compile(r"([\\`*_\[\]()#!|~])")


def md(value) -> str:
    """Markdown text that renders as the plain string: no live HTML, no links, no formatting.

    One line (a newline would start a new block or break a table row); backslash and the
    punctuation Markdown acts on backslash-escaped, and so are a list or quote marker at
    the start; `://` and `www.` broken so no renderer autolinks a URL; then &, <, >, " and '
    HTML-escaped (after the backslashes, so the entities stay intact).
    """
    text = " ".join(str(value).splitlines())
    text = _MD_PUNCTUATION.sub(r"\\\1", text)
    text = re.sub(r"^(\s*)([-+=>])(?=[-+=>\s]|$)", r"\1\\\2", text)  # "- x", "> x", "---": list, quote, rule
    text = re.sub(r"^(\s*\d+)\.(?=\s|$)", r"\1\\.", text)  # "1. x" would start a numbered list
    text = text.replace("://", r"\://")
    text = re.sub(r"(?i)\b(www)\.", r"\1\\.", text)
    return html.escape(text, quote=True)


def md_code(value) -> str:
    """A Markdown code span showing the value as typed (a code span parses no Markdown and no HTML,
    so it needs no escapes, only a backtick fence longer than any backtick run inside)."""
    text = " ".join(str(value).splitlines())
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _environment(autoescape: bool):
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("klstore.report", "templates"),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = _fmt
    env.filters["md"] = md
    env.filters["md_code"] = md_code
    return env


def _heading(shown: Figure) -> str:
    """The sub-heading a figure sits under: its prompt group where it has one, else its model."""
    grid = shown.grid
    if grid.kind == "aggregate" and "prompt_group" in grid.labels:
        return f"Group {grid.labels['prompt_group']}"
    return str(grid.labels.get("model") or grid.labels.get("probe"))


def render_html(spec: ReportSpec, report: Report, store_uri: str, env=None) -> str:
    """index.html: every figure in a grid (interactive, its PNG until drawn), the summary, the
    listing pages; every user string escaped."""
    shown = report.figures
    names = list(dict.fromkeys(f.grid.section for f in shown))  # in order of first appearance
    sections = []
    for i, name in enumerate(names):
        ordered = sorted((f for f in shown if f.grid.section == name), key=_heading)
        sections.append(
            {
                "id": f"s{i}",
                "title": name.capitalize(),
                "headings": [(head, list(items)) for head, items in itertools.groupby(ordered, _heading)],
            }
        )
    largest = {f.grid.fig_id: _largest(f.grid, report.prompt_pages) for f in shown if f.grid.kind == "aggregate"}
    figures = {f.grid.fig_id: interactive.figure(f, report.prompt_pages) for f in shown}
    figures.update({v.lens.fig_id: interactive.lines_figure(lens_lines(v.lens)) for v in report.lenses})
    return (
        (env or _environment(autoescape=True))
        .get_template("index.html.j2")
        .render(
            spec=spec,
            store_uri=store_uri,
            built=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            summary_names=report.summary[0],
            summary_rows=report.summary[1],
            sections=sections,
            noise_floor=floor.summary_line(report.floors),
            listings=report.listings,
            largest=largest,
            lenses=_lens_sections(report.lenses),
            lens_threshold=floor.LENS_EVAL_FLOOR,
            figures=_figures_json(figures),
            root="",
        )
    )


def _largest(grid: Grid, pages: dict, top: int = 3) -> list:
    """The prompts that hold the largest value in the most cells: [(prompt id, cells, page or None)]."""
    held = Counter(
        (at["model"], at["run_id"], at["prompt_id"]) for at in grid.hover.get("max_at", np.empty(0)).flat if at
    )
    return [
        (key[2] if "model" in grid.labels else f"{key[2]} ({key[0]})", n, pages.get(key))
        for key, n in held.most_common(top)
    ]


def _lens_sections(views) -> list:
    """The Lenses section's models in order: [(model, [(view, table names, table rows)])]."""
    ordered = sorted(views, key=lambda v: (v.lens.model, v.lens.held_out_hash or ""))
    return [
        (model, [(v, *v.lens.table()) for v in items])
        for model, items in itertools.groupby(ordered, lambda v: v.lens.model)
    ]


def render_markdown(spec: ReportSpec, figures, summary, floors: floor.Floors | None = None, lens_views=()) -> str:
    """report.md: the summary table, the noise floor per model, every figure with its
    observations, and the Lenses section where there are lens figures (figure.LensView); each
    value through the `md` filter (`md_code` inside a code span)."""
    sections = [
        (name.capitalize(), list(items)) for name, items in itertools.groupby(figures, lambda f: f.grid.section)
    ]
    return (
        _environment(autoescape=False)
        .get_template("report.md.j2")
        .render(
            spec=spec,
            summary_names=summary[0],
            summary_rows=summary[1],
            sections=sections,
            noise_floor=floor.summary_line(floors or floor.Floors({})),
            lenses=_lens_sections(lens_views),
            lens_threshold=floor.LENS_EVAL_FLOOR,
        )
        .rstrip("\n")
        + "\n"
    )
