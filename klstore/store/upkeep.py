"""Store upkeep: run summaries, `verify` (what is wrong) and `compact` (fewer, larger files).

Compaction writes through the store's one atomic writer (`Store.write_file`).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from klstore.errors import first_line
from klstore.store.tables import TABLES, TMP_MARK, Store, work_key
from klstore.store.views import connect, read_parquet_sql, sql


def run_summaries(store: Store) -> list[dict]:
    """One dict per run: run_id, name, status, created_at, prompts, failed, kl_rows, bytes."""
    sizes: dict[str, int] = {}
    for table in TABLES:
        for path in store.files(table):
            run = next((p[len("run_id="):] for p in path.split("/") if p.startswith("run_id=")), None)
            if run is not None:
                sizes[run] = sizes.get(run, 0) + store.fs.get_file_info(path).size
    names, rows = sql(store, """
        SELECT r.run_id, r.name, r.status, r.created_at,
               (SELECT count(*) FROM prompts p WHERE p.run_id = r.run_id) AS prompts,
               (SELECT count(*) FROM prompts p WHERE p.run_id = r.run_id AND p.status <> 'ok') AS failed,
               (SELECT count(*) FROM kl k WHERE k.run_id = r.run_id) AS kl_rows
        FROM runs r ORDER BY r.created_at""")
    out = [dict(zip(names, row)) for row in rows]
    for item in out:
        item["bytes"] = sizes.get(item["run_id"], 0)
    return out


_KEYS = {
    "kl": ("run_id", "model", "probe", "prompt_id", "layer", "gen_idx"),
    "generations": ("run_id", "model", "prompt_id", "gen_idx"),
    "prompts": ("run_id", "model", "prompt_id"),
    "runs": ("run_id",),
}


def verify(store: Store) -> dict[str, list[str]]:
    """Problems found: unreadable files, leftover temporary files, duplicate keys per table."""
    import duckdb

    problems: dict[str, list[str]] = {"unreadable": [], "temporary": [], "duplicates": []}
    for table in TABLES:
        readable = []
        for path in store.files(table, suffix=""):
            if TMP_MARK in path.rsplit("/", 1)[-1]:
                problems["temporary"].append(path)
                continue
            if not path.endswith(".parquet"):
                continue
            try:
                with store.fs.open_input_file(path) as handle:
                    pq.read_metadata(handle)
                readable.append(path)
            except (OSError, pa.ArrowInvalid) as exc:
                problems["unreadable"].append(f"{path}: {first_line(exc)}")
        if not readable or not store.is_local:
            continue
        con = duckdb.connect(":memory:")
        keys = ", ".join(_KEYS[table])
        dupes = con.execute(f"SELECT {keys}, count(*) FROM ({read_parquet_sql(table, '$files')}) "
                            f"GROUP BY ALL HAVING count(*) > 1 LIMIT 20", {"files": readable}).fetchall()
        for row in dupes:
            problems["duplicates"].append(f"{table}: {dict(zip(_KEYS[table], row[:-1]))} x{row[-1]}")
    if not store.is_local:
        con = connect(store)
        for table, keys in _KEYS.items():
            cols = ", ".join(keys)
            for row in con.execute(f"SELECT {cols}, count(*) FROM {table} GROUP BY ALL "
                                   "HAVING count(*) > 1 LIMIT 20").fetchall():
                problems["duplicates"].append(f"{table}: {dict(zip(keys, row[:-1]))} x{row[-1]}")
    return problems


def compact(store: Store, min_files: int = 2) -> list[tuple[str, int]]:
    """Merge each partition's Parquet files into one; returns (folder, files merged) per partition.

    The merged file is written (atomically) before the originals are removed, so
    a crash in between leaves duplicates that `verify` reports and a rerun of
    `compact` cannot remove; it never loses rows.
    """
    done = []
    for table, (schema, _) in TABLES.items():
        if table == "runs":
            continue  # one file per run already
        folders: dict[str, list[str]] = {}
        for path in store.files(table):
            folders.setdefault(path.rsplit("/", 1)[0], []).append(path)
        for folder, paths in sorted(folders.items()):
            if len(paths) < min_files:
                continue
            parts = []
            for path in paths:
                part = pq.read_table(path, filesystem=store.fs, partitioning=None)
                for field in schema:
                    if field.name not in part.column_names:  # an older schema
                        part = part.append_column(field.name, pa.nulls(len(part), field.type))
                parts.append(part.select(schema.names).cast(schema))
            merged = pa.concat_tables(parts)
            sort_keys = [(c, "ascending") for c in ("prompt_id", "layer", "gen_idx") if c in schema.names]
            merged = merged.sort_by(sort_keys)
            name = f"compact-{work_key(*[p.rsplit('/', 1)[-1] for p in paths])}.parquet"
            final = f"{folder}/{name}"
            store.write_file(final, merged, schema)
            for path in paths:
                if path != final:
                    store.fs.delete_file(path)
            done.append((folder, len(paths)))
    return done
