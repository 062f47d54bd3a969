"""Reports: store rows -> aggregated grids -> heatmaps + observations -> a static site.

Everything comes from the store's views (KL is never recomputed). Steps:
1. `collect`  SQL aggregates per grouping of the spec (mean or median, non-null
              values only: non-finite values are stored as null and never averaged in),
              plus comparisons (model vs model, group vs group) and per-prompt grids;
2. `observe`  numbers -> sentences for every grid (peaks, standout cells, columns, layers);
3. `build`    figures (PNG + SVG), index.html, report.md and manifest.json in a fresh
              build folder; a figure whose inputs (spec, partition files) are unchanged
              is copied from the previous build instead of redrawn;
4. publish    the output path is a symlink swapped atomically to the new build, so a
              reader never sees a half-built report.
This module never imports torch.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from klstore.errors import KlstoreError
from klstore.spec import ReportSpec, parse_layers

DIM_TITLES = {"model": "model", "probe": "probe", "prompt_group": "group"}


@dataclass
class Grid:
    """One figure's numbers: values (len(layers), len(columns)), NaN where no value."""

    fig_id: str
    section: str
    title: str
    layers: tuple
    columns: tuple
    values: np.ndarray
    counts: np.ndarray
    n_prompts: int
    divergence: str
    kind: str  # "aggregate" | "difference" | "prompt"
    labels: dict  # model, probe, prompt_group, ...
    inputs: tuple = ()  # (model, probe) partitions it reads
    ylabel: str = "Layer"
    observations: list = field(default_factory=list)


# ------------------------------------------------------------------ collect
def _in_list(column: str, values) -> str:
    quoted = ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)
    return f"{column} IN ({quoted})"


def _filters(con, spec: ReportSpec) -> tuple[str, dict]:
    """The WHERE clause for the spec; unknown names are errors that list what exists."""
    def existing(sql):
        return sorted(str(r[0]) for r in con.execute(sql).fetchall())

    if not con.execute("SELECT count(*) FROM kl").fetchone()[0]:
        raise KlstoreError("the store is empty: no kl rows to report on (run `klstore run` first)")
    clauses = [f"{spec.divergence} IS NOT NULL"]
    chosen: dict = {}
    if spec.runs == "latest":  # each model's newest run (by the runs table; unknown runs count as oldest)
        latest = con.execute("""
            SELECT model, arg_max(run_id, coalesce(r.created_at, TIMESTAMPTZ '1970-01-01 00:00:00+00'))
            FROM (SELECT DISTINCT model, run_id FROM kl) LEFT JOIN runs r USING (run_id)
            GROUP BY model ORDER BY model""").fetchall()
        pairs = " OR ".join(f"(model = '{m}' AND run_id = '{r}')" for m, r in latest)
        clauses.append(f"({pairs})")
        chosen["runs"] = sorted({r for _, r in latest})
    elif spec.runs:
        ids = existing("SELECT DISTINCT run_id FROM kl")
        names = dict(con.execute("SELECT run_id, name FROM runs").fetchall())
        picked = [r for r in ids if r in spec.runs or names.get(r) in spec.runs]
        missing = [r for r in spec.runs if r not in ids and r not in names.values()]
        if missing:
            raise KlstoreError(f"run {missing[0]!r} is not in the store; runs: {', '.join(ids)}")
        clauses.append(_in_list("run_id", picked))
        chosen["runs"] = picked
    for key, column in (("models", "model"), ("probes", "probe"), ("groups", "prompt_group")):
        wanted = getattr(spec, key)
        if wanted:
            have = existing(f"SELECT DISTINCT {column} FROM kl")
            missing = [w for w in wanted if w not in have]
            if missing:
                raise KlstoreError(f"{column.replace('prompt_', '')} {missing[0]!r} is not in the store; "
                                   f"{key}: {', '.join(have)}")
            clauses.append(_in_list(column, wanted))
    return " AND ".join(clauses), chosen


def _layers_for(spec: ReportSpec, model: str, n_layers: int) -> tuple[int, ...]:
    return parse_layers(spec.layers_for(model), n_layers, model)


def _slug(*parts) -> str:
    text = "-".join(str(p) for p in parts)
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:80]
    return f"{safe}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _grid_from_rows(rows, layers, n_cols):
    values = np.full((len(layers), n_cols), np.nan)
    counts = np.zeros((len(layers), n_cols), dtype=int)
    index = {layer: i for i, layer in enumerate(layers)}
    for layer, gen_idx, value, count in rows:
        if layer in index and gen_idx < n_cols:
            values[index[layer], gen_idx] = value
            counts[index[layer], gen_idx] = count
    return values, counts


def collect(con, spec: ReportSpec, where: str) -> list[Grid]:
    """Every grid the spec asks for, straight from the store's views (`where` from _filters)."""
    agg = "avg" if spec.aggregate == "mean" else "median"
    div = spec.divergence
    n_layers = dict(con.execute(f"SELECT model, max(n_layers) FROM kl WHERE {where} GROUP BY model").fetchall())
    for model, count in list(n_layers.items()):
        if count is None:  # files from before n_layers was stored
            n_layers[model] = con.execute(f"SELECT max(layer) + 1 FROM kl WHERE model = '{model}'").fetchone()[0]
    grids: list[Grid] = []
    overall: dict = {}
    by_group: dict = {}
    for grouping in spec.group_by:
        dims = ", ".join(grouping)
        cells = con.execute(
            f"SELECT {dims}, layer, gen_idx, {agg}({div}), count({div}) FROM kl WHERE {where} "
            f"GROUP BY ALL ORDER BY ALL").fetchall()
        prompts = {tuple(r[:-1]): r[-1] for r in con.execute(
            f"SELECT {dims}, count(DISTINCT prompt_id) FROM kl WHERE {where} GROUP BY ALL").fetchall()}
        figures: dict = {}
        for row in cells:
            figures.setdefault(tuple(row[:len(grouping)]), []).append(row[len(grouping):])
        section = "by " + ", ".join(DIM_TITLES[d] for d in grouping)
        for key, rows in figures.items():
            labels = dict(zip(grouping, key))
            model = labels.get("model")
            layers = _layers_for(spec, model, n_layers[model]) if model else tuple(sorted({r[0] for r in rows}))
            n_cols = max(r[1] for r in rows) + 1
            values, counts = _grid_from_rows(rows, layers, n_cols)
            title = " | ".join(f"{labels[d]}" for d in grouping) + f" | {spec.aggregate} of {prompts[key]} prompts"
            grid = Grid(_slug("agg", *grouping, *key), section, title, layers,
                        tuple(f"Gen{i}" for i in range(n_cols)), values, counts, prompts[key], div,
                        "aggregate", labels, inputs=_inputs_for(labels, n_layers))
            grids.append(grid)
            if set(grouping) >= {"model", "probe"}:
                target = by_group if "prompt_group" in grouping else overall
                target[key] = grid
    if spec.compare_models:
        grids += _model_comparisons(con, spec, where, agg, n_layers)
    if spec.compare_groups:
        grids += _group_comparisons(by_group)
    if spec.per_prompt:
        grids += _per_prompt(con, spec, where, n_layers)
    return grids


def _inputs_for(labels: dict, n_layers: dict) -> tuple:
    models = [labels["model"]] if "model" in labels else sorted(n_layers)
    return tuple((m, labels.get("probe")) for m in models)


def _full_grid(con, where, agg, div, model, probe, n_layers):
    rows = con.execute(f"SELECT layer, gen_idx, {agg}({div}), count({div}) FROM kl WHERE {where} "
                       f"AND model = '{model}' AND probe = '{probe}' GROUP BY ALL").fetchall()
    n_cols = max(r[1] for r in rows) + 1
    return _grid_from_rows(rows, tuple(range(n_layers)), n_cols)


def _model_comparisons(con, spec, where, agg, n_layers) -> list[Grid]:
    """A - B for each probe and pair of models; by relative depth when layer counts differ."""
    out = []
    pairs = con.execute(f"SELECT probe, list(DISTINCT model ORDER BY model) FROM kl WHERE {where} "
                        "GROUP BY probe ORDER BY probe").fetchall()
    for probe, models in pairs:
        for i in range(len(models)):
            for j in range(i + 1, len(models)):
                a, b = models[i], models[j]
                va, ca = _full_grid(con, where, agg, spec.divergence, a, probe, n_layers[a])
                vb, cb = _full_grid(con, where, agg, spec.divergence, b, probe, n_layers[b])
                n_cols = min(va.shape[1], vb.shape[1])
                if n_layers[a] == n_layers[b]:
                    layers = _layers_for(spec, a, n_layers[a])
                    rows_a = rows_b = list(layers)
                    ylabel, shown = "Layer", layers
                else:  # relative depth: the shallower model's layers, the deeper one's nearest
                    small, big = (a, b) if n_layers[a] < n_layers[b] else (b, a)
                    m, n = n_layers[small], n_layers[big]
                    mapped = [round(k * (n - 1) / max(m - 1, 1)) for k in range(m)]
                    rows_a = list(range(m)) if a == small else mapped
                    rows_b = list(range(m)) if b == small else mapped
                    shown = tuple(round(k / max(m - 1, 1), 2) for k in range(m))
                    ylabel = f"Relative depth ({small} layer k, {big} layer {n - 1}k/{m - 1})"
                values = va[rows_a, :n_cols] - vb[rows_b, :n_cols]
                counts = np.minimum(ca[rows_a, :n_cols], cb[rows_b, :n_cols])
                title = f"{a} minus {b} | {probe} | {spec.aggregate}"
                out.append(Grid(_slug("cmp-models", probe, a, b), "model comparisons", title, tuple(shown),
                                tuple(f"Gen{c}" for c in range(n_cols)), values, counts,
                                int(counts.max()) if counts.size else 0, spec.divergence, "difference",
                                {"probe": probe, "a": a, "b": b}, inputs=((a, probe), (b, probe)), ylabel=ylabel))
    return out


def _group_comparisons(by_group: dict) -> list[Grid]:
    """Group A - group B per model and probe: all pairs up to 4 groups, else each vs the rest's mean."""
    out = []
    per: dict = {}
    for key, grid in by_group.items():
        per.setdefault((grid.labels["model"], grid.labels["probe"]), []).append(grid)
    for (model, probe), grids in sorted(per.items()):
        grids = sorted(grids, key=lambda g: g.labels["prompt_group"])
        if len(grids) < 2:
            continue
        pairs = [(x, y) for i, x in enumerate(grids) for y in grids[i + 1:]] if len(grids) <= 4 else \
            [(x, None) for x in grids]
        for x, y in pairs:
            n_cols = x.values.shape[1] if y is None else min(x.values.shape[1], y.values.shape[1])
            if y is None:
                rest = [g.values[:, :n_cols] for g in grids if g is not x]
                other, other_name = np.nanmean(np.stack(rest), axis=0), "the other groups"
                counts = x.counts[:, :n_cols]
            else:
                other, other_name = y.values[:, :n_cols], y.labels["prompt_group"]
                counts = np.minimum(x.counts[:, :n_cols], y.counts[:, :n_cols])
            name = x.labels["prompt_group"]
            out.append(Grid(_slug("cmp-groups", model, probe, name, other_name), "group comparisons",
                            f"{model} | {probe} | {name} minus {other_name}", x.layers,
                            tuple(f"Gen{c}" for c in range(n_cols)), x.values[:, :n_cols] - other, counts,
                            int(counts.max()) if counts.size else 0, x.divergence, "difference",
                            {"model": model, "probe": probe, "a": name, "b": other_name},
                            inputs=((model, probe),)))
    return out


def _per_prompt(con, spec, where, n_layers) -> list[Grid]:
    """The first `per_prompt` prompts (by id) per model and probe, from their latest run,
    with the generated token texts on the x axis."""
    out = []
    picks = con.execute(f"""
        SELECT model, probe, prompt_id,
               arg_max(run_id, coalesce(r.created_at, TIMESTAMPTZ '1970-01-01 00:00:00+00')) AS latest
        FROM kl LEFT JOIN runs r USING (run_id) WHERE {where} GROUP BY model, probe, prompt_id
        QUALIFY row_number() OVER (PARTITION BY model, probe ORDER BY prompt_id) <= {spec.per_prompt}
        ORDER BY ALL""").fetchall()
    for model, probe, prompt_id, run_id in picks:
        rows = con.execute(f"SELECT layer, gen_idx, {spec.divergence}, 1 FROM kl WHERE model = ? AND probe = ? "
                           f"AND prompt_id = ? AND run_id = ?", [model, probe, prompt_id, run_id]).fetchall()
        tokens = con.execute("SELECT gen_idx, token_text FROM generations WHERE model = ? AND prompt_id = ? "
                             "AND run_id = ? ORDER BY gen_idx", [model, prompt_id, run_id]).fetchall()
        text = con.execute("SELECT prompt_text FROM prompts WHERE model = ? AND prompt_id = ? AND run_id = ?",
                           [model, prompt_id, run_id]).fetchone()
        if not rows:
            continue
        layers = _layers_for(spec, model, n_layers[model])
        n_cols = max(r[1] for r in rows) + 1
        values, counts = _grid_from_rows(rows, layers, n_cols)
        from klstore.report.plotting import column_labels

        texts = [t for _, t in tokens][:n_cols]
        columns = column_labels(n_cols, texts) if len(texts) == n_cols else column_labels(n_cols)
        out.append(Grid(_slug("prompt", model, probe, prompt_id), "per-prompt heatmaps",
                        f"{model} | {probe} | {prompt_id}", layers, columns, values, counts, 1,
                        spec.divergence, "prompt",
                        {"model": model, "probe": probe, "prompt_id": prompt_id,
                         "prompt_text": text[0] if text else "", "run_id": run_id},
                        inputs=((model, probe),)))
    return out


# ------------------------------------------------------------------ observe
def _cell(grid: Grid, r: int, c: int) -> str:
    return f"layer {grid.layers[r]}, Gen{c}" if grid.ylabel == "Layer" else f"depth {grid.layers[r]}, Gen{c}"


def observe(grid: Grid) -> list[str]:
    """What an analyst would say about the grid, from its numbers."""
    v = grid.values
    finite = v[np.isfinite(v)]
    unit = "nats"
    if finite.size == 0:
        return ["No finite values in this grid."]
    mean, std, lo, hi = float(finite.mean()), float(finite.std()), float(finite.min()), float(finite.max())
    out = []
    if grid.kind == "difference":
        a, b = grid.labels["a"], grid.labels["b"]
        higher = int((finite > 0).sum())
        r, c = np.unravel_index(np.nanargmax(np.abs(np.where(np.isfinite(v), v, 0))), v.shape)
        out.append(f"{a} is higher than {b} in {higher} of {finite.size} cells; the mean difference is "
                   f"{mean:+.3g} {unit}.")
        out.append(f"The largest gap is at {_cell(grid, r, c)}: {v[r, c]:+.3g} {unit}.")
        if hi - lo <= 0.05 * max(abs(mean), 1e-12) or max(abs(lo), abs(hi)) < 1e-3:
            out.append("The difference is flat: the two are practically the same here.")
        return out
    spread = hi - lo
    if spread <= 0.05 * max(abs(mean), 1e-12) or spread < 1e-6:
        out.append(f"The grid is flat: every cell is within {spread:.3g} {unit} of the others "
                   f"(mean {mean:.3g} {unit}).")
        return out
    r, c = np.unravel_index(np.nanargmax(np.where(np.isfinite(v), v, -np.inf)), v.shape)
    out.append(f"{grid.divergence} peaks at {_cell(grid, r, c)} with {v[r, c]:.3g} {unit}, "
               f"{v[r, c] / mean:.1f}x the grid mean of {mean:.3g} {unit}.")
    col_means = np.nanmean(np.where(np.isfinite(v), v, np.nan), axis=0)
    if v.shape[1] > 1:
        best = int(np.nanargmax(col_means))
        others = float(np.nanmean(np.delete(col_means, best)))
        if others > 0 and col_means[best] / others >= 1.3:
            out.append(f"Gen{best} stands out: its mean {col_means[best]:.3g} {unit} is "
                       f"{col_means[best] / others:.1f}x that of the other tokens ({others:.3g}).")
        else:
            out.append(f"The generated tokens are alike: column means range from {np.nanmin(col_means):.3g} "
                       f"to {np.nanmax(col_means):.3g} {unit}.")
    row_means = np.nanmean(np.where(np.isfinite(v), v, np.nan), axis=1)
    if v.shape[0] > 2:
        top = np.argsort(-np.nan_to_num(row_means, nan=-np.inf))[:3]
        names = ", ".join(f"{grid.layers[i]} ({row_means[i]:.3g})" for i in top)
        noun = "Layers" if grid.ylabel == "Layer" else "Depths"
        out.append(f"{noun} with the highest mean {grid.divergence}: {names}.")
        third = max(1, len(row_means) // 3)
        early, late = float(np.nanmean(row_means[:third])), float(np.nanmean(row_means[-third:]))
        if early > 0 and late > 0 and max(early, late) / min(early, late) >= 2:
            trend = "falls" if early > late else "rises"
            out.append(f"{grid.divergence} {trend} with depth: {early:.3g} {unit} on average in the first third "
                       f"of the listed layers, {late:.3g} in the last third.")
    outliers = np.argwhere(np.isfinite(v) & (v > mean + 2 * std)) if std > 0 else []
    if len(outliers):
        listed = "; ".join(f"{_cell(grid, r, c)} ({v[r, c]:.3g})" for r, c in outliers[:5])
        more = f" and {len(outliers) - 5} more" if len(outliers) > 5 else ""
        out.append(f"{len(outliers)} cell{'s are' if len(outliers) > 1 else ' is'} more than two standard "
                   f"deviations above the mean: {listed}{more}.")
    if grid.kind == "aggregate" and grid.counts.size and grid.counts.max() > grid.counts.min():
        full = int(grid.counts.max())
        short = sorted({int(c) for c in np.where(grid.counts.min(axis=0) < full)[0]})
        parts = ", ".join(f"Gen{c} by {int(grid.counts[:, c].min())}" for c in short[:5])
        out.append(f"Not every prompt reached every token (early end of sequence): of {full}, {parts}.")
    return out


# -------------------------------------------------------------------- build
def _input_stats(store, spec: ReportSpec, chosen_runs) -> dict:
    """(model, probe) -> sorted (path, size, mtime_ns) of the kl files a figure reads."""
    stats: dict = {}
    for path in store.files("kl"):
        parts = dict(p.split("=", 1) for p in path.split("/") if "=" in p)
        if chosen_runs is not None and parts.get("run_id") not in chosen_runs:
            continue
        info = os.stat(path) if store.is_local else None
        size = info.st_size if info else store.fs.get_file_info(path).size
        mtime = info.st_mtime_ns if info else 0
        stats.setdefault((parts.get("model"), parts.get("probe")), []).append(
            (os.path.relpath(path, store.root) if store.is_local else path, size, mtime))
    return stats


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


def default_out(store, spec: ReportSpec) -> Path:
    if store.is_local:
        return Path(store.root) / "reports" / spec.name
    return Path("klstore-reports") / spec.name


def build(store, spec: ReportSpec, out: Path | None = None, force: bool = False,
          log=print) -> dict:
    """Build (or update) the report; returns {'index', 'drawn', 'reused', 'seconds', 'changed'}."""
    from klstore import __version__
    from klstore.store import views as query

    start = time.perf_counter()
    out = Path(out) if out else default_out(store, spec)
    out = out.absolute()
    if out.exists() and not out.is_symlink():
        raise KlstoreError(f"report output {out} exists and is not a klstore report (a symlink to a build); "
                           "choose another --out")
    builds = out.parent / f".{out.name}.builds"
    try:
        builds.mkdir(parents=True, exist_ok=True)
        probe_file = builds / f".write-test-{uuid.uuid4().hex}"
        probe_file.write_text("")
        probe_file.unlink()
    except OSError as exc:
        raise KlstoreError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    previous = out.resolve() if out.is_symlink() else None
    old_manifest = {}
    if previous and (previous / "manifest.json").exists():
        old_manifest = json.loads((previous / "manifest.json").read_text())
    con = query.connect(store)
    where, chosen = _filters(con, spec)
    stats = _input_stats(store, spec, chosen.get("runs"))
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
    from klstore.report import plotting

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
            lo_hi = scales.get(grid.section, (None, None))
            fig = plotting.save(_heatmap_data(grid), build_dir / png, build_dir / svg, vmin=lo_hi[0], vmax=lo_hi[1])
            del fig
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


def _publish(build_dir: Path, out: Path) -> None:
    """Point `out` at the new build with one atomic rename of a symlink."""
    link = out.parent / f".{out.name}.link-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.relpath(build_dir, out.parent), link)
    os.replace(link, out)


def _shared_scales(grids) -> dict:
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


def _heatmap_data(grid: Grid):
    from klstore.report.plotting import DIVERGENCE_LABELS, HeatmapData

    label = DIVERGENCE_LABELS.get(grid.divergence, grid.divergence)
    if grid.kind == "difference":
        return HeatmapData(grid.values, grid.layers, grid.columns, grid.title, grid.divergence,
                           counts=None, cmap="RdBu_r", colorbar_label=f"Difference in {label}", ylabel=grid.ylabel)
    return HeatmapData(grid.values, grid.layers, grid.columns, grid.title, grid.divergence,
                       counts=grid.counts if grid.kind == "aggregate" else None, ylabel=grid.ylabel)


def _summary(con, spec: ReportSpec, where: str):
    names = ["model", "probe", "prompts", "cells", f"mean {spec.divergence}", "top-1 agreement"]
    rows = con.execute(f"SELECT model, probe, count(DISTINCT prompt_id), count(*), avg({spec.divergence}), "
                       f"avg(top1_match::INT) FROM kl WHERE {where} GROUP BY ALL ORDER BY ALL").fetchall()
    return names, rows


# ------------------------------------------------------------------- render
_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
nav{background:#f6f6f2;padding:.5em 1em;border:1px solid #ddd}figure{display:inline-block;vertical-align:top;
margin:1em;max-width:520px}figure img{max-width:100%;border:1px solid #eee}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}th{background:#f0f0e8}
.obs{font-size:.9em;color:#333}code{background:#f4f4f4}"""


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_html(spec: ReportSpec, grids, summary, store_uri: str) -> str:
    """index.html: self-contained (inline CSS, local images); every user string escaped."""
    e = html.escape
    sections = []
    for grid in grids:
        if grid.section not in sections:
            sections.append(grid.section)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>klstore report "
             f"{e(spec.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>KL report: {e(spec.name)}</h1>",
             f"<p>Store <code>{e(store_uri)}</code>; {e(spec.aggregate)} of <code>{e(spec.divergence)}</code> "
             f"(nats) over prompts; layers <code>{e(spec.layers)}</code>. Built "
             f"{e(time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))}.</p>",
             "<nav><strong>Contents</strong><ul><li><a href='#summary'>Summary</a></li>"]
    for i, section in enumerate(sections):
        parts.append(f"<li><a href='#s{i}'>{e(section.capitalize())}</a></li>")
    parts.append("</ul></nav>")
    names, rows = summary
    parts.append("<h2 id='summary'>Summary</h2><table><tr>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{e(_fmt(v))}</td>" for v in row) + "</tr>")
    parts.append("</table>")
    for i, section in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{e(section.capitalize())}</h2>")
        current = None
        for grid in sorted((g for g in grids if g.section == section), key=_heading):
            head = _heading(grid)
            if head != current:
                current = head
                parts.append(f"<h3>{e(str(head))}</h3>")
            extra = ""
            if grid.kind == "prompt":
                extra = f"<p class='obs'>Prompt: <q>{e(grid.labels.get('prompt_text', ''))}</q></p>"
            obs = "".join(f"<li>{e(o)}</li>" for o in grid.observations)
            parts.append(f"<figure id='{e(grid.fig_id)}'><img src='figures/{e(grid.fig_id)}.png' "
                         f"alt='{e(grid.title)}'><figcaption>{e(grid.title)} "
                         f"(<a href='figures/{e(grid.fig_id)}.svg'>SVG</a>)</figcaption>{extra}"
                         f"<ul class='obs'>{obs}</ul></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _heading(grid: Grid) -> str:
    """The sub-heading a figure sits under: its prompt group where it has one, else its model."""
    if grid.kind == "aggregate" and "prompt_group" in grid.labels:
        return f"Group {grid.labels['prompt_group']}"
    return str(grid.labels.get("model") or grid.labels.get("probe"))


def render_markdown(spec: ReportSpec, grids, summary) -> str:
    names, rows = summary
    lines = [f"# KL report: {spec.name}", "",
             f"{spec.aggregate} of `{spec.divergence}` (nats); layers `{spec.layers}`.", "", "## Summary", "",
             "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    section = None
    for grid in grids:
        if grid.section != section:
            section = grid.section
            lines += ["", f"## {section.capitalize()}", ""]
        title = grid.title.replace("|", "\\|")
        lines += [f"### {title}", "", f"![{title}](figures/{grid.fig_id}.png)", ""]
        lines += [f"- {o}" for o in grid.observations] + [""]
    return "\n".join(lines)
