"""DuckDB over a store: read-only views `kl`, `generations`, `prompts`, `runs`, and upkeep.

Local stores are read with `read_parquet(..., hive_partitioning = true,
union_by_name = true)`, so files written by an older schema (fewer columns)
read with nulls in the new columns. S3 stores are read through pyarrow
datasets registered in DuckDB (no DuckDB extension download needed).
"""

from __future__ import annotations

import csv
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from klstore.errors import KlstoreError
from klstore.store import TABLES, TMP_MARK, VIEW_COLUMNS, Store, work_key

_DUCK_TYPES = {
    pa.string(): "VARCHAR", pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.float32(): "FLOAT",
    pa.bool_(): "BOOLEAN", pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
}


def _column_types(table: str) -> dict[str, str]:
    schema, partitions = TABLES[table]
    types = {name: "VARCHAR" for name in partitions}
    types.update({field.name: _DUCK_TYPES[field.type] for field in schema})
    return types


def _empty_view(table: str) -> str:
    types = _column_types(table)
    cols = ", ".join(f"CAST(NULL AS {types[c]}) AS {c}" for c in VIEW_COLUMNS[table])
    return f"SELECT {cols} WHERE false"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _read_parquet(table: str, source: str) -> str:
    _, partitions = TABLES[table]
    hive_types = ", ".join(f"{_quote(p)}: 'VARCHAR'" for p in partitions)
    types = _column_types(table)
    cols = ", ".join(f"CAST({c} AS {types[c]}) AS {c}" for c in VIEW_COLUMNS[table])
    return (f"SELECT {cols} FROM read_parquet({source}, hive_partitioning = true, "
            f"union_by_name = true, hive_types = {{{hive_types}}})")


def view_statements(store: Store, for_shell: bool = False) -> dict[str, str]:
    """`CREATE VIEW` statements for a local store (or, for the shell, an S3 one via httpfs)."""
    out = {}
    for table in TABLES:
        if store.is_local and not store.files(table):
            body = _empty_view(table)
        elif store.is_local:
            body = _read_parquet(table, _quote(store.path(table, "**", "*.parquet")))
        elif for_shell:
            body = _read_parquet(table, _quote(f"s3://{store.root}/{table}/**/*.parquet"))
        else:
            raise ValueError("S3 views are registered datasets, not SQL")
        out[table] = f"CREATE OR REPLACE VIEW {table} AS {body};"
    return out


def connect(store: Store | str | None = None):
    """A DuckDB connection with the four views over the store (Python API for notebooks).

        con = klstore.query.connect("./klstore-data")
        con.sql("SELECT layer, avg(kl) FROM kl GROUP BY layer").df()
    """
    import duckdb

    from klstore.store import open_store

    if not isinstance(store, Store):
        store = open_store(store)
    con = duckdb.connect(":memory:")
    if store.is_local:
        for sql in view_statements(store).values():
            con.execute(sql)
        return con
    import pyarrow.dataset as ds

    for table, (schema, partitions) in TABLES.items():
        if not store.files(table):
            con.execute(f"CREATE VIEW {table} AS {_empty_view(table)}")
            continue
        part_schema = pa.schema([(p, pa.string()) for p in partitions])
        full = pa.schema(list(schema) + list(part_schema))
        dataset = ds.dataset(store.path(table), filesystem=store.fs, format="parquet",
                             partitioning=ds.partitioning(part_schema, flavor="hive"), schema=full)
        con.register(f"_{table}_dataset", dataset)
        cols = ", ".join(VIEW_COLUMNS[table])
        con.execute(f"CREATE VIEW {table} AS SELECT {cols} FROM _{table}_dataset")
    return con


def sql(store: Store | str | None, query: str):
    """Run a query over the views; returns (column names, rows). SQL errors are KlstoreErrors."""
    import duckdb

    con = connect(store)
    try:
        result = con.execute(query)
        if result.description is None:
            return [], []
        names = [d[0] for d in result.description]
        return names, result.fetchall()
    except duckdb.Error as exc:
        raise KlstoreError(f"SQL error: {str(exc).splitlines()[0]}") from None


def format_rows(names, rows, fmt: str) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(names)
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    if fmt == "json":
        return json.dumps([dict(zip(names, row)) for row in rows], default=str, indent=1)
    if fmt != "table":
        raise KlstoreError(f"unknown format {fmt!r}: choose table, csv or json")
    shown = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(n)] + [len(r[i]) for r in shown]) for i, n in enumerate(names)]
    lines = [" | ".join(n.ljust(w) for n, w in zip(names, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in shown]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("\n", "\\n")


# ------------------------------------------------------------------ upkeep
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
                problems["unreadable"].append(f"{path}: {str(exc).splitlines()[0]}")
        if not readable or not store.is_local:
            continue
        con = duckdb.connect(":memory:")
        source = "[" + ", ".join(_quote(p) for p in readable) + "]"
        keys = ", ".join(_KEYS[table])
        dupes = con.execute(f"SELECT {keys}, count(*) FROM ({_read_parquet(table, source)}) "
                            f"GROUP BY ALL HAVING count(*) > 1 LIMIT 20").fetchall()
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
    from klstore.store import parquet_options

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
            options = parquet_options(schema)
            if store.is_local:
                tmp = f"{final}{TMP_MARK}compact"
                pq.write_table(merged, tmp, **options)
                os.replace(tmp, final)
            else:
                pq.write_table(merged, final, filesystem=store.fs, **options)
            for path in paths:
                if path != final:
                    store.fs.delete_file(path)
            done.append((folder, len(paths)))
    return done
