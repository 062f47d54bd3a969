"""Grids -> a static site: figures, index.html, report.md and manifest.json, published atomically.

`build` filters and aggregates (klstore.report.aggregate), writes observations
(klstore.report.observe) and figures (PNG + SVG, klstore.report.plotting) into a
fresh build folder. A figure whose inputs (spec, partition files, shared scale)
are unchanged is copied from the previous build instead of redrawn; when no input
changed at all, nothing is built. index.html and report.md are rendered from the
jinja2 templates in templates/: HTML with autoescaping, Markdown through the `md`
filter (user strings can become neither live HTML nor links). The output path is
a symlink swapped atomically to the new build, so a reader never sees a half-built
report. This module never imports torch.
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
from pathlib import Path

import numpy as np

from klstore.errors import KlstoreError
from klstore.report.aggregate import Grid, _filters, _summary, collect
from klstore.report.observe import observe
from klstore.spec import ReportSpec


# -------------------------------------------------------------------- build
def default_out(store, spec: ReportSpec) -> Path:
    if store.is_local:
        return Path(store.root) / "reports" / spec.name
    return Path("klstore-reports") / spec.name


def build(store, spec: ReportSpec, out: Path | None = None, force: bool = False,
          log=print) -> dict:
    """Build (or update) the report; returns {'index', 'drawn', 'reused', 'seconds', 'changed'}.
    A store that cannot be read (a corrupt file) is one KlstoreError naming the problem."""
    import duckdb

    from klstore.errors import first_line

    try:
        return _build_or_reuse(store, spec, out, force, log)
    except duckdb.Error as exc:
        message = first_line(exc)
        hint = "" if "verify" in message else "; run `klstore verify` to check the store's files"
        raise KlstoreError(f"cannot read the store for the report: {message}{hint}") from None


def _build_or_reuse(store, spec: ReportSpec, out, force: bool, log) -> dict:
    from klstore.store import views as query

    start = time.perf_counter()
    out = Path(out) if out else default_out(store, spec)
    out = out.absolute()
    if out.exists() and not out.is_symlink():
        raise KlstoreError(f"report output {out} exists and is not a klstore report (a symlink to a build); "
                           "choose another --out")
    builds = out.parent / f".{out.name}.builds"
    con = query.connect(store)
    where, chosen = _filters(con, spec)  # a spec that matches nothing fails before anything is written
    created = not builds.exists()
    try:
        builds.mkdir(parents=True, exist_ok=True)
        probe_file = builds / f".write-test-{uuid.uuid4().hex}"
        probe_file.write_text("")
        probe_file.unlink()
    except OSError as exc:
        raise KlstoreError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    try:
        return _build(store, spec, out, builds, con, where, chosen, force, log, start)
    except BaseException:
        if created:  # a failed first build leaves no empty .builds folder behind
            shutil.rmtree(builds, ignore_errors=True)
        raise


def _build(store, spec, out, builds, con, where, chosen, force, log, start) -> dict:
    from klstore import __version__
    from klstore.report import plotting

    previous = out.resolve() if out.is_symlink() else None
    old_manifest = {}
    if previous and (previous / "manifest.json").exists():
        old_manifest = json.loads((previous / "manifest.json").read_text())
    stats = _input_stats(store, chosen.get("runs"))
    all_inputs = hashlib.sha256(json.dumps([spec.describe(), sorted((f"{k}", v) for k, v in stats.items())],
                                           default=str).encode()).hexdigest()
    if not force and old_manifest.get("inputs_sha256") == all_inputs:
        log(f"report {spec.name}: inputs unchanged, nothing to redraw")
        return {"index": out / "index.html", "drawn": 0, "reused": len(old_manifest.get("figures", {})),
                "seconds": time.perf_counter() - start, "changed": False}
    grids = collect(con, spec, where)
    build_dir = builds / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    (build_dir / "figures").mkdir(parents=True)
    scales = _shared_scales(grids) if spec.shared_scale else {}
    drawn = reused = 0
    figures = {}
    for grid in grids:
        grid.observations = observe(grid)
        key = _figure_key(spec, grid, stats, json.dumps(scales.get(grid.section)))
        png, svg = f"figures/{grid.fig_id}.png", f"figures/{grid.fig_id}.svg"
        old = old_manifest.get("figures", {}).get(grid.fig_id)
        if not force and old and old.get("key") == key and previous and (previous / png).exists() \
                and (previous / svg).exists():
            shutil.copy2(previous / png, build_dir / png)
            shutil.copy2(previous / svg, build_dir / svg)
            reused += 1
        else:
            lo, hi = scales.get(grid.section, (None, None))
            plotting.save(heatmap_data(grid), build_dir / png, build_dir / svg, vmin=lo, vmax=hi)
            drawn += 1
        figures[grid.fig_id] = {"key": key, "png": png, "svg": svg, "title": grid.title,
                                "section": grid.section, "observations": grid.observations,
                                "inputs": [list(i) for i in grid.inputs]}
    summary = _summary(con, spec, where)
    manifest = {
        "report": spec.name, "spec": spec.describe(), "spec_source": spec.source, "store": store.uri,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "klstore_version": __version__,
        "inputs_sha256": all_inputs,
        "input_files": {f"{m}/{p}": files for (m, p), files in sorted(stats.items(), key=str)},
        "figures": figures,
    }
    (build_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    (build_dir / "index.html").write_text(render_html(spec, grids, summary, store.uri), encoding="utf-8")
    (build_dir / "report.md").write_text(render_markdown(spec, grids, summary), encoding="utf-8")
    _publish(build_dir, out)
    for old_build in builds.iterdir():
        if old_build.is_dir() and old_build != build_dir:
            shutil.rmtree(old_build, ignore_errors=True)
    seconds = time.perf_counter() - start
    log(f"report {spec.name}: {len(grids)} figures ({drawn} drawn, {reused} unchanged) in {seconds:.1f} s")
    return {"index": out / "index.html", "drawn": drawn, "reused": reused, "seconds": seconds, "changed": True}


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
        relative = path[len(root):] if path.startswith(root) else path
        stats.setdefault((parts.get("model"), parts.get("probe")), []).append((relative, digest))
    return {key: sorted(files) for key, files in stats.items()}


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


def _shared_scales(grids) -> dict:
    """section -> (vmin, vmax) over all its grids; symmetric about 0 where it holds differences."""
    scales = {}
    for section in {g.section for g in grids}:
        values = np.concatenate([g.values[np.isfinite(g.values)] for g in grids if g.section == section] or [[]])
        if values.size:
            if any(g.kind == "difference" for g in grids if g.section == section):
                bound = float(np.abs(values).max())
                scales[section] = (-bound, bound)
            else:
                scales[section] = (float(values.min()), float(values.max()))
    return scales


def heatmap_data(grid: Grid):
    """The plain value a heatmap is drawn from (differences on a diverging map, no counts)."""
    from klstore.report.plotting import DIVERGENCE_LABELS, HeatmapData

    label = DIVERGENCE_LABELS.get(grid.divergence, grid.divergence)
    if grid.kind == "difference":
        return HeatmapData(grid.values, grid.layers, grid.columns, grid.title, grid.divergence,
                           counts=None, cmap="RdBu_r", colorbar_label=f"Difference in {label}", ylabel=grid.ylabel)
    return HeatmapData(grid.values, grid.layers, grid.columns, grid.title, grid.divergence,
                       counts=grid.counts if grid.kind == "aggregate" else None, ylabel=grid.ylabel)


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

    env = jinja2.Environment(loader=jinja2.PackageLoader("klstore.report", "templates"),
                             autoescape=autoescape, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.filters["md"] = md
    env.filters["md_code"] = md_code
    return env


def _heading(grid: Grid) -> str:
    """The sub-heading a figure sits under: its prompt group where it has one, else its model."""
    if grid.kind == "aggregate" and "prompt_group" in grid.labels:
        return f"Group {grid.labels['prompt_group']}"
    return str(grid.labels.get("model") or grid.labels.get("probe"))


def render_html(spec: ReportSpec, grids, summary, store_uri: str) -> str:
    """index.html: self-contained (inline CSS, local images); every user string escaped."""
    names = list(dict.fromkeys(g.section for g in grids))  # in order of first appearance
    sections = []
    for i, name in enumerate(names):
        ordered = sorted((g for g in grids if g.section == name), key=_heading)
        sections.append({"id": f"s{i}", "title": name.capitalize(),
                         "headings": [(head, list(items)) for head, items in itertools.groupby(ordered, _heading)]})
    return _environment(autoescape=True).get_template("index.html.j2").render(
        spec=spec, store_uri=store_uri, built=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        summary_names=summary[0], summary_rows=summary[1], sections=sections)


def render_markdown(spec: ReportSpec, grids, summary) -> str:
    """report.md: the summary table and every figure with its observations; each value through
    the `md` filter (`md_code` inside a code span)."""
    sections = [(name.capitalize(), list(items)) for name, items in itertools.groupby(grids, lambda g: g.section)]
    return _environment(autoescape=False).get_template("report.md.j2").render(
        spec=spec, summary_names=summary[0], summary_rows=summary[1], sections=sections).rstrip("\n") + "\n"
