"""Store upkeep: run summaries, `verify` (what is wrong) and `compact` (fewer, larger files).

Compaction writes through the store's one atomic writer (`Store.write_file`).
"""

from __future__ import annotations

import pyarrow as pa

from klstore.errors import KlstoreError
from klstore.store.integrity import (
    _shards_of,
    check_file,
    compact,
    missing_or_unrecorded,
    read_record,
    record_files,
    recover,
    stray_files,
    stray_message,
    unpartitioned,
    visible,
)
from klstore.store.integrity import quarantine as quarantine_files
from klstore.store.tables import TABLES, Store
from klstore.store.views import present_columns, read_parquet_sql, sql

__all__ = ["PROBLEMS", "QUARANTINED", "compact", "mean_map", "run_summaries", "run_totals", "shard_summaries", "verify"]


def run_summaries(store: Store) -> list[dict]:
    """One dict per run: run_id, name, status, created_at, prompts, failed, kl_rows, bytes."""
    sizes: dict[str, int] = {}
    for table in TABLES:
        for path in store.files(table):
            run = next((p[len("run_id=") :] for p in path.split("/") if p.startswith("run_id=")), None)
            if run is not None:
                sizes[run] = sizes.get(run, 0) + store.fs.get_file_info(path).size
    names, rows = sql(
        store,
        """
        SELECT r.run_id, r.name, r.status, r.created_at,
               (SELECT count(*) FROM prompts p WHERE p.run_id = r.run_id) AS prompts,
               (SELECT count(*) FROM prompts p WHERE p.run_id = r.run_id AND p.status <> 'ok') AS failed,
               (SELECT count(*) FROM kl k WHERE k.run_id = r.run_id) AS kl_rows
        FROM runs r ORDER BY r.created_at""",
    )
    out = [dict(zip(names, row)) for row in rows]
    for item in out:
        item["bytes"] = sizes.get(item["run_id"], 0)
    return out


def run_totals(store: Store | str, run_id: str) -> tuple[list[str], list]:
    """Per model and probe of one run: prompts, cells, mean KL, top-1 rate (`klstore run`'s summary)."""
    return sql(
        store,
        """
        SELECT model, probe, count(DISTINCT prompt_id) AS prompts, count(*) AS cells,
               round(avg(kl), 4) AS mean_kl, round(avg(top1_match::INT), 3) AS top1_rate
        FROM kl WHERE run_id = ? GROUP BY ALL ORDER BY ALL""",
        [run_id],
    )


def lens_summaries(store: Store | str) -> tuple[list[str], list]:
    """`klstore lens list`: every fitted lens, with its mean held-out KL over layers next to the
    logit lens's on the same held-out split and the same layers (a lens fitted at some blocks
    only is compared at those)."""
    return sql(
        store,
        """
        SELECT l.model, l.lens_id, l.kind, l.tokens, l.workers, round(l.wall_s, 1) AS wall_s,
               round(l.final_loss, 4) AS final_loss,
               round((SELECT avg(kl) FROM lens_eval e WHERE e.lens_id = l.lens_id
                      AND e.held_out_hash = l.held_out_hash), 4) AS held_out_kl,
               round((SELECT avg(kl) FROM lens_eval e WHERE e.lens_id = 'logit' AND e.model = l.model
                      AND e.held_out_hash = l.held_out_hash
                      AND e.layer IN (SELECT layer FROM lens_eval f WHERE f.lens_id = l.lens_id
                                      AND f.held_out_hash = l.held_out_hash)), 4) AS logit_kl,
               l.corpus, l.created_at
        FROM lenses l ORDER BY l.model, l.created_at""",
    )


def lens_eval_table(store: Store | str, model: str | None = None) -> tuple[list[str], list]:
    """`klstore lens eval`: held-out KL and top-1 agreement per model, lens and layer (the
    latest evaluation of each lens on each held-out split)."""
    where, params = ("WHERE model = ?", [model]) if model else ("", [])
    return sql(
        store,
        f"""
        SELECT model, lens, lens_id, layer, round(avg(kl), 4) AS kl,
               round(avg(top1_agreement), 3) AS top1_agreement, max(tokens) AS tokens, held_out_hash
        FROM lens_eval {where} GROUP BY ALL ORDER BY model, held_out_hash, lens, lens_id, layer""",
        params,
    )


def mean_map(con, divergence: str, model: str, probe: str, group: str | None = None, run: str | None = None):
    """The mean `divergence` per (layer, gen_idx) over the prompts of a model and probe (optionally
    one prompt group and run id), nulls left out: (rows of (layer, gen_idx, mean, count), number
    of prompts); `divergence` is a checked name (spec.check_divergences)."""
    where, params = "model = ? AND probe = ?", [model, probe]
    if group is not None:
        where, params = where + " AND prompt_group = ?", params + [group]
    if run is not None:
        where, params = where + " AND run_id = ?", params + [run]
    rows = con.execute(
        f"SELECT layer, gen_idx, avg({divergence}), count({divergence}) FROM kl WHERE {where} GROUP BY layer, gen_idx",
        params,
    ).fetchall()
    n_prompts = con.execute(f"SELECT count(DISTINCT prompt_id) FROM kl WHERE {where}", params).fetchone()[0]
    return rows, n_prompts


def shard_summaries(store: Store, run: str) -> dict[str, tuple[list[str], list]]:
    """From the `shards` view, for one run (its id, or a run name: that name's newest run):
    {"per node": ..., "per actor": ..., "failed or lost attempts": ...}, each (column names, rows).
    Throughput is cells over the wall-clock span from the first start to the last end of the
    successful attempts (so a node's actors working at once add up)."""
    _, found = sql(
        store,
        "SELECT run_id FROM runs WHERE run_id = ? OR name = ? ORDER BY run_id = ? DESC, created_at DESC LIMIT 1",
        [run, run, run],
    )
    run_id = found[0][0] if found else run
    _, count = sql(store, "SELECT count(*) FROM shards WHERE run_id = ?", [run_id])
    if not count[0][0]:
        _, runs = sql(store, "SELECT DISTINCT run_id FROM shards ORDER BY 1")
        raise KlstoreError(
            f"no shard attempts recorded for run {run!r} (runs written before the shards table "
            f"have none); runs with attempts: {', '.join(r[0] for r in runs) or 'none'}"
        )
    span = "epoch(max(ended_at)) - epoch(min(started_at))"
    throughput = (
        f"count(*) AS shards, sum(prompts) AS prompts, sum(cells) AS cells, round({span}, 1) AS seconds, "
        f"round(sum(cells) / greatest({span}, 1e-6), 1) AS cells_per_second"
    )
    queries = {
        "per node": f"SELECT node, {throughput} FROM shards WHERE run_id = ? AND outcome = 'ok' "
        "GROUP BY node ORDER BY node",
        "per actor": f"SELECT model, node, actor, device, {throughput} FROM shards WHERE run_id = ? "
        "AND outcome = 'ok' GROUP BY ALL ORDER BY model, node, actor",
        "failed or lost attempts": "SELECT model, shard_key, node, actor, outcome, started_at, ended_at, error "
        "FROM shards WHERE run_id = ? AND outcome <> 'ok' ORDER BY started_at",
    }
    return {title: sql(store, query, [run_id]) for title, query in queries.items()}


_KEYS = {
    "kl": ("run_id", "model", "probe", "prompt_id", "layer", "gen_idx"),
    "generations": ("run_id", "model", "prompt_id", "gen_idx"),
    "prompts": ("run_id", "model", "prompt_id"),
    "runs": ("run_id",),
    "shards": ("run_id", "model", "shard_key", "actor", "started_at", "outcome"),
    "tokens": ("model", "token_id"),
}


PROBLEMS = {
    "bad": "files that are unreadable or differ from their record",
    "temporary": "temporary files left by a crash",
    "stray": "files outside the table's partition folders",
    "unrecorded": "files with no record (written before records, or copied in by hand)",
    "missing": "records whose file is missing",
    "folders": "folders klstore never writes",
    "duplicates": "duplicate rows",
}


QUARANTINED = ("bad", "temporary", "stray")  # the kinds of problem `--quarantine` moves aside


def verify(store: Store, quarantine: bool = False, record: bool = False, log=lambda m: None) -> dict:
    """Check every file of the store. Returns {"problems": {kind: [lines]}, "files", "bytes",
    "duplicate_rows", "quarantined": [paths], "recorded": n}.

    Each file is checked against its record (SHA-256, size) or, without one, read with its
    page checksums. Duplicates: two files of a partition holding the same shard (from the
    records); a partition with such an overlap, or with unrecorded files, is scanned row by
    row, and every duplicate row is counted. `quarantine` moves bad, temporary and stray files to
    <store>/_quarantine/ (never deletes); `record` writes records for unrecorded readable files.
    An interrupted compaction is finished or undone first.
    """
    recover(store, log)
    problems: dict[str, list[str]] = {kind: [] for kind in PROBLEMS}
    checked = size = duplicate_rows = 0
    to_quarantine: list[str] = []
    for table in TABLES:
        good: dict[str, list[str]] = {}
        unrecorded_folders: set[str] = set()
        orphans, unrecorded = missing_or_unrecorded(store, table)  # one listing, before any check
        for path in visible(store, table):
            info = read_record(store, path)
            problem = check_file(store, path, info)
            checked += 1
            size += store.fs.get_file_info(path).size
            if problem:
                problems["bad"].append(f"{path}: {problem}")
                to_quarantine.append(path)
                continue
            folder = path.rsplit("/", 1)[0]
            good.setdefault(folder, []).append(path)
            if info is None:
                unrecorded_folders.add(folder)
        problems["missing"] += [f"{p}: its file is missing" for p in orphans]
        problems["unrecorded"] += [f"{p}: no record" for p in unrecorded if p not in to_quarantine]
        for path in stray_files(store, table):
            problems["temporary"].append(path)
            to_quarantine.append(path)
        for path in unpartitioned(store, table):
            problems["stray"].append(stray_message(table, path))
            to_quarantine.append(path)
        problems["folders"] += [
            f"{folder}: klstore never writes such a folder" for folder in _strange_folders(store, table)
        ]
        for folder, paths in sorted(good.items()):
            if folder in unrecorded_folders or _shards_overlap(store, paths):
                count, examples = _duplicates(store, table, paths)
                duplicate_rows += count
                problems["duplicates"] += examples
    result = {
        "problems": problems,
        "files": checked,
        "bytes": size,
        "duplicate_rows": duplicate_rows,
        "quarantined": [],
        "recorded": 0,
    }
    if quarantine and to_quarantine:
        result["quarantined"] = quarantine_files(store, to_quarantine)
    if record:
        result["recorded"] = record_files(store, [p.rsplit(": ", 1)[0] for p in problems["unrecorded"]])
    return result


def _shards_overlap(store: Store, paths: list[str]) -> bool:
    seen: set[str] = set()
    for path in paths:
        shards = set(_shards_of(store, path))
        if shards & seen:
            return True
        seen |= shards
    return False


def _duplicates(store: Store, table: str, paths: list[str]) -> tuple[int, list[str]]:
    """Exact count of rows beyond the first for each key, and up to 5 examples."""
    import duckdb

    keys = ", ".join(_KEYS[table])
    con = duckdb.connect(":memory:")
    if store.is_local:
        params = {"files": paths}
        source = f"({read_parquet_sql(table, '$files', present_columns(con, table, '$files', params))})"
    else:
        import pyarrow.dataset as ds

        _, partitions = TABLES[table]
        part_schema = pa.schema([(p, pa.string()) for p in partitions])
        con.register(
            "_files",
            ds.dataset(
                paths,
                filesystem=store.fs,
                format="parquet",
                partitioning=ds.partitioning(part_schema, flavor="hive"),
                partition_base_dir=store.path(table),
            ),
        )
        source, params = "_files", None
    groups = f"SELECT {keys}, count(*) AS n FROM {source} GROUP BY ALL HAVING count(*) > 1"
    summed = con.execute(f"SELECT coalesce(sum(n - 1), 0) FROM ({groups})", params).fetchone()
    assert summed is not None  # an aggregate without GROUP BY returns exactly one row
    total = summed[0]
    examples = con.execute(f"{groups} ORDER BY n DESC LIMIT 5", params).fetchall()
    return int(total), [f"{table}: {dict(zip(_KEYS[table], row[:-1]))} x{row[-1]}" for row in examples]


def _strange_folders(store: Store, table: str) -> list[str]:
    """Folders under a table that are not the table's own `key=<label>` partitions."""
    from pyarrow import fs as pafs

    from klstore.spec import check_label

    _, keys = TABLES[table]
    base = store.path(table)
    out = []
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    for info in store.fs.get_file_info(selector):
        if info.type != pafs.FileType.Directory:
            continue
        parts = info.path[len(base) + 1 :].split("/")
        depth = len(parts) - 1
        key, _, value = parts[-1].partition("=")
        try:
            ok = depth < len(keys) and key == keys[depth] and check_label(value, key) == value
        except KlstoreError:
            ok = False
        if not ok:
            out.append(info.path)
    return out
