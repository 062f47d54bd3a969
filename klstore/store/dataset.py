"""A run as a dataset: `klstore export RUN --to DIR` (docs/dataset.md); the layout, the
manifest and the row conversions that `dataset_import` (`klstore import DIR`) shares.

An export is a folder that plain pyarrow and `datasets.load_dataset(DIR, "kl")` read:

    README.md                              the dataset card (card.py): configs and provenance
    klstore-export.json                    the manifest: run id, each file's table and partition,
                                           and every file's record (SHA-256, rows, bytes, shards)
    data/<table>/<model>[/<probe>]/<file>  one file per store file of the run, with the view's
                                           columns (partition columns included)
    data/lens_tokens/<model>/<probe>/<f>   the lens tokens with their texts (one per kl file)
    lens_files/<lens id>/                  the fitted lenses the run read through

Tables are carried generically: whatever columns the store's schemas have (tables.TABLES)
are exported, and imported back into the same schema. Records live in the manifest, not
beside each file, so `pq.read_table("DIR/data/kl")` reads a folder of nothing but Parquet.

This module never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from klstore.errors import KlstoreError, first_line
from klstore.spec import check_label, is_lens_id
from klstore.store import card as cards
from klstore.store.integrity import check_file, read_record, visible
from klstore.store.tables import (
    RECORD_SUFFIX,
    TABLES,
    TMP_MARK,
    VIEW_COLUMNS,
    VIEW_DEFAULTS,
    Store,
    open_store,
    parquet_options,
)

MANIFEST = "klstore-export.json"
CARD = "README.md"
DATA = "data"
LENS_FILES = "lens_files"  # as run.lenses.LENS_FILES: <store>/lens_files/<lens id>/
FORMAT = 1
RUN_TABLES = ("kl", "prompts", "generations", "runs", "shards")  # partitioned by run_id
LENS_TOKENS = "lens_tokens"
IMPORT_STAGING = "_import"  # <store>/_import/<uuid>/: an import's files before they move into place
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_DROPPED_METADATA = (b"ARROW:schema", b"pandas", b"huggingface")


# ------------------------------------------------------------------ schemas
def view_schema(table: str) -> pa.Schema:
    """The exported columns of a table: its view's (partition columns as strings), then any
    schema column the view list lacks, so a column added to the schema is carried unchanged."""
    schema, partitions = TABLES[table]
    fields = {name: pa.field(name, pa.string()) for name in partitions}
    fields.update({field.name: field for field in schema})
    names = [name for name in VIEW_COLUMNS[table] if name in fields]
    names += [name for name in fields if name not in names]
    return pa.schema([fields[name] for name in names])


def _metadata(table: pa.Table) -> dict:
    """A file's own schema metadata (e.g. the tokens file's tokenizer fingerprint), without
    what pyarrow, pandas and datasets add."""
    meta = table.schema.metadata or {}
    return {key: value for key, value in meta.items() if key not in _DROPPED_METADATA}


def to_view_rows(table: str, rows: pa.Table, partition: dict[str, str]) -> pa.Table:
    """A store file's rows as the view reads them: missing (older) columns as nulls or the
    view's default, partition columns added, columns in the view's order."""
    schema = view_schema(table)
    defaults = VIEW_DEFAULTS.get(table, {})
    columns = []
    for field in schema:
        if field.name in partition:
            column = pa.array([partition[field.name]] * rows.num_rows, pa.string())
        elif field.name in rows.column_names:
            column = rows.column(field.name).cast(field.type)
        else:
            column = pa.nulls(rows.num_rows, field.type)
        if field.name in defaults:
            import pyarrow.compute as pc

            column = pc.fill_null(column, pa.scalar(defaults[field.name], field.type))
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema.with_metadata(_metadata(rows)))


def to_store_rows(table: str, rows: pa.Table, where: str) -> pa.Table:
    """An exported file's rows in the store's schema (partition columns dropped). A column this
    klstore does not know is an error (the export is newer): dropping it would lose data."""
    schema, partitions = TABLES[table]
    known = set(view_schema(table).names)
    unknown = [name for name in rows.column_names if name not in known]
    if unknown:
        raise KlstoreError(
            f"{where}: column {unknown[0]!r} is not in this klstore's {table} table (exported by a newer klstore?)"
        )
    columns = [
        rows.column(f.name).cast(f.type) if f.name in rows.column_names else pa.nulls(rows.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema.with_metadata(_metadata(rows)))


# ------------------------------------------------------------- file helpers
def _parquet_bytes(rows: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(rows, sink, **parquet_options(rows.schema))
    return sink.getvalue().to_pybytes()


def record_of(data: bytes, rows: int | None = None, shards=None) -> dict:
    """A file's record, in the store's format (tables.Store.write_file; lens files: run.lenses.put)."""
    record: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if rows is not None:
        record.update(rows=rows, shards=list(shards or []))
    return record


def _write(folder: Path, relative: str, data: bytes) -> None:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def partition_of(store: Store, table: str, path: str) -> dict[str, str]:
    _, keys = TABLES[table]
    folders = path[len(store.path(table).rstrip("/")) + 1 :].split("/")[:-1]
    return {key: folder.partition("=")[2] for key, folder in zip(keys, folders)}


def data_path(table: str, partition: dict[str, str], name: str) -> str:
    """data/<table>/<partition values but the run id>/<name>: plain folder names (no key=value),
    so no reader takes them for Hive partitions of a column the files already hold."""
    values = [partition[key] for key in TABLES[table if table != LENS_TOKENS else "kl"][1] if key != "run_id"]
    return "/".join([DATA, table, *values, name])


def find_run(store: Store, run: str) -> str:
    """The run id of `run` (an id, or a run name: its newest run); a one-line error if absent."""
    from klstore.store.views import sql

    _, found = sql(
        store,
        "SELECT run_id FROM runs WHERE run_id = ? OR name = ? ORDER BY run_id = ? DESC, created_at DESC LIMIT 1",
        [run, run, run],
    )
    if not found:
        raise KlstoreError(f"run {run!r} is not in store {store.uri} (see `klstore runs`)")
    return found[0][0]


# ------------------------------------------------------------------- export
class _Export:
    """One export being written into a staging folder: its files, their records, what the card says."""

    def __init__(self, store: Store, run_id: str, folder: Path):
        self.store, self.run_id, self.folder = store, run_id, folder
        self.tables: dict[str, list[dict]] = {}
        self.checksums: dict[str, dict] = {}
        self.rows: dict[str, pa.Table] = {}  # small tables kept for the card (runs, shards)
        self.stats: dict[str, Any] = {"probes": set(), "layers": set(), "lenses": set()}

    def add(self, table: str, rows: pa.Table, partition: dict[str, str], name: str, shards=None) -> None:
        relative = data_path(table, partition, name)
        data = _parquet_bytes(rows)
        _write(self.folder, relative, data)
        self.checksums[relative] = record_of(data, rows.num_rows, shards)
        self.tables.setdefault(table, []).append({"path": relative, "partition": partition, "name": name})

    def read_store_file(self, table: str, path: str) -> tuple[pa.Table, list]:
        """A store file of the run, checked against its record first (a damaged file is named)."""
        record = read_record(self.store, path)
        problem = check_file(self.store, path, record)
        if problem:
            raise KlstoreError(f"{path}: {problem}; run `klstore verify` (nothing exported)")
        rows = pq.read_table(path, filesystem=self.store.fs, partitioning=None)
        name = path.rsplit("/", 1)[-1]
        shards = (record or {}).get("shards")
        if shards is None:
            shards = [name[len("part-") :].split(".", 1)[0]] if name.startswith("part-") else []
        return rows, shards


def export_run(store_uri: Store | str, run: str, to: str | Path, exported_by: str, log=lambda message: None) -> dict:
    """Write run `run` (an id or a name) of the store as a dataset folder at `to` (see the
    module docstring). `to` must not exist, be empty, or hold an export of the same run (then
    it is written again, replacing that export's files). Returns a summary."""
    store = open_store(store_uri)
    run_id = find_run(store, run)
    target = Path(to).expanduser().absolute()
    old = _existing_export(target, run_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}{TMP_MARK}{uuid.uuid4().hex}"
    try:
        summary = _export_into(store, run_id, staging, exported_by, log)
        _publish(staging, target, old)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return {**summary, "folder": str(target)}


def _existing_export(target: Path, run_id: str) -> dict | None:
    """The manifest of a same-run export at `target` (None: nothing there); errors otherwise."""
    if not target.exists():
        return None
    if not target.is_dir():
        raise KlstoreError(f"--to {target} is a file, not a folder")
    if not any(target.iterdir()):
        return None
    manifest = target / MANIFEST
    if not manifest.is_file():
        raise KlstoreError(f"--to {target} is not empty and holds no klstore export: give an empty or new folder")
    old = read_manifest(target)
    if old["run_id"] != run_id:
        raise KlstoreError(
            f"--to {target} holds the export of run {old['run_id']}, not {run_id}: give an empty or new folder"
        )
    return old


def _publish(staging: Path, target: Path, old: dict | None) -> None:
    """Move the finished export into place: one rename into a new or empty folder; over a same-run
    export, file by file (card and manifest last), then the old export's files not written again
    are removed (only those its manifest lists; anything else in the folder is left alone)."""
    if old is None:
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
        return
    new = read_manifest(staging)
    for relative in sorted(new["checksums"], key=lambda p: p == CARD) + [MANIFEST]:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / relative, target / relative)
    for relative in old["checksums"]:
        if relative not in new["checksums"] and (target / relative).is_file():
            (target / relative).unlink()


def _export_into(store: Store, run_id: str, folder: Path, exported_by: str, log) -> dict:
    folder.mkdir(parents=True)
    out = _Export(store, run_id, folder)
    labels: set[str] = set()
    for table in RUN_TABLES:
        for path in visible(store, table):
            partition = partition_of(store, table, path)
            if partition.get("run_id") != run_id:
                continue
            rows, shards = out.read_store_file(table, path)
            view = to_view_rows(table, rows, partition)
            name = path.rsplit("/", 1)[-1]
            out.add(table, view, {k: v for k, v in partition.items()}, name, shards)
            labels.update([partition["model"]] if "model" in partition else [])
            if table == "kl":
                _kl_stats(out.stats, view)
            elif table in ("runs", "shards"):
                out.rows[table] = pa.concat_tables([out.rows[table], view]) if table in out.rows else view
    if "runs" not in out.rows:
        raise KlstoreError(f"run {run_id}: its runs row is not in store {store.uri}")
    tokens: dict[str, pa.Table] = {}
    for label in sorted(labels):
        for path in visible(store, "tokens"):
            if partition_of(store, "tokens", path).get("model") != label:
                continue
            rows, shards = out.read_store_file("tokens", path)
            view = to_view_rows("tokens", rows, {"model": label})
            out.add("tokens", view, {"model": label}, path.rsplit("/", 1)[-1], shards)
            tokens[label] = pa.concat_tables([tokens[label], view]) if label in tokens else view
    for entry in list(out.tables.get("kl", [])):
        kl = pq.read_table(folder / entry["path"])
        lens_tokens = _lens_tokens(kl, tokens.get(entry["partition"]["model"]))
        out.add(LENS_TOKENS, lens_tokens, entry["partition"], entry["name"])
    lens_files = _export_lenses(out, log)
    meta, columns = _card_meta(out, lens_files, exported_by)
    card = cards.render(meta, columns).encode()
    _write(folder, CARD, card)
    out.checksums[CARD] = record_of(card)
    manifest = {
        "klstore_export": FORMAT,
        "run_id": run_id,
        "exported_by": exported_by,
        "tables": out.tables,
        "lens_files": lens_files,
        "checksums": out.checksums,
    }
    _write(folder, MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return {"run_id": run_id, "rows": meta["klstore"]["rows"], "files": len(out.checksums) + 1}


def _kl_stats(stats: dict, view: pa.Table) -> None:
    import pyarrow.compute as pc

    stats["probes"].update(pc.unique(view.column("probe")).to_pylist())
    stats["layers"].update(pc.unique(view.column("layer")).to_pylist())
    pairs = view.select(["probe", "lens", "lens_id"]).group_by(["probe", "lens", "lens_id"]).aggregate([])
    stats["lenses"].update(zip(*(pairs.column(c).to_pylist() for c in ("probe", "lens", "lens_id"))))


def _lens_tokens(kl: pa.Table, tokens: pa.Table | None) -> pa.Table:
    """The `lens_tokens` view (store.views.DERIVED_VIEWS, the one definition) over one kl file."""
    import duckdb

    from klstore.store.views import DERIVED_VIEWS

    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    con.register("kl", kl)
    con.register("tokens", tokens if tokens is not None else view_schema("tokens").empty_table())
    con.execute("SET enable_external_access = false")
    query = f"SELECT * FROM ({DERIVED_VIEWS['lens_tokens']}) ORDER BY probe, prompt_id, layer, gen_idx, rank"
    return con.sql(query).to_arrow_table()


def _export_lenses(out: _Export, log) -> dict[str, list[str]]:
    """Copy the store's files of every fitted lens the run read through (checked against their
    records); a lens read from a path outside the store has none, and the card says so."""
    from pyarrow import fs as pafs

    found: dict[str, list[str]] = {}
    for lens_id in sorted({lens_id for _, _, lens_id in out.stats["lenses"] if lens_id != "logit"}):
        base = out.store.path(LENS_FILES, lens_id)
        infos = out.store.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        names = sorted(
            info.base_name
            for info in infos
            if info.type == pafs.FileType.File
            and not info.base_name.endswith(RECORD_SUFFIX)
            and TMP_MARK not in info.base_name
        )
        if not names:
            log(f"lens {lens_id} is not in the store (read from a path): its files are not in the export")
            continue
        for name in names:
            data = out.store.read_bytes(f"{base}/{name}") or b""
            record = read_record(out.store, f"{base}/{name}")
            if record and record.get("sha256") != hashlib.sha256(data).hexdigest():
                raise KlstoreError(f"{base}/{name}: checksum mismatch (the lens file was changed or damaged)")
            relative = f"{LENS_FILES}/{lens_id}/{name}"
            _write(out.folder, relative, data)
            out.checksums[relative] = record_of(data)
        found[lens_id] = names
    return found


def _lens_provenance(folder: Path, lens_id: str) -> dict:
    try:
        data = json.loads((folder / LENS_FILES / lens_id / "klstore.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str | int | float | bool) or v is None}


def _card_meta(out: _Export, lens_files: dict, exported_by: str) -> tuple[dict, dict]:
    """The card's header: one config per table, and the run's provenance (from the exported rows)."""
    run = out.rows["runs"].to_pylist()[0]
    try:
        config = json.loads(run["config"] or "{}")
    except ValueError:
        config = {}
    shards = out.rows.get("shards")
    fingerprints: dict[str, set] = {}
    for row in shards.select(["model", "fingerprint"]).to_pylist() if shards is not None else []:
        if row["fingerprint"] is not None:
            fingerprints.setdefault(row["model"], set()).add(row["fingerprint"])
    models = [
        {
            "label": m.get("label"),
            "name": m.get("name"),
            "dtype": m.get("dtype"),
            "fingerprints": sorted(fingerprints.get(m.get("label"), ())),
        }
        for m in config.get("models", [])
    ]
    lenses = [
        {
            "probe": probe,
            "kind": kind,
            "id": lens_id,
            "files": lens_id in lens_files,
            "provenance": _lens_provenance(out.folder, lens_id) if lens_id in lens_files else {},
        }
        for probe, kind, lens_id in sorted(out.stats["lenses"])
    ]
    rows = {table: sum(out.checksums[e["path"]]["rows"] for e in entries) for table, entries in out.tables.items()}
    configs = [
        {
            "config_name": table,
            "data_files": [{"split": "train", "path": _pattern(table)}],
            **({"default": True} if table == "kl" else {}),
        }
        for table in out.tables
    ]
    created = run.get("created_at")
    provenance = {
        "run_id": out.run_id,
        "run_name": run.get("name"),
        "status": run.get("status"),
        "created_at": created.isoformat() if created is not None else None,
        "models": models,
        "probes": config.get("probes", []),
        "probe_names": sorted(out.stats["probes"]),
        "layers": config.get("layers"),
        "layers_stored": sorted(out.stats["layers"]),
        "divergences": config.get("divergences", []),
        "generation": config.get("generation", {}),
        "lenses": lenses,
        "prompts_sha256": config.get("prompts_sha256"),
        "noise_floor": run.get("noise_floor"),
        "klstore_version": run.get("klstore_version"),
        "torch_version": run.get("torch_version"),
        "transformers_version": run.get("transformers_version"),
        "exported_by": exported_by,
        "rows": rows,
        "config": config,
    }
    meta = {
        "pretty_name": f"klstore run {out.run_id}",
        "tags": ["klstore", "interpretability", "logit-lens"],
        "configs": configs,
        "klstore": provenance,
    }
    columns = {
        table: [(f.name, str(f.type)) for f in pq.read_schema(out.folder / entries[0]["path"])]
        for table, entries in out.tables.items()
    }
    return meta, columns


def _pattern(table: str) -> str:
    """The data_files glob of a config: exactly its folder depth (no `**`)."""
    depth = len([k for k in TABLES[table if table != LENS_TOKENS else "kl"][1] if k != "run_id"])
    return "/".join([DATA, table, *["*"] * depth, "*.parquet"])


# -------------------------------------------------------------- the manifest
def read_manifest(folder: str | Path) -> dict:
    """The manifest of an export folder, its shape checked (names and paths are from outside)."""
    folder = Path(folder)
    if not folder.exists():
        raise KlstoreError(f"{folder} does not exist")
    if not folder.is_dir():
        raise KlstoreError(f"{folder} is a file, not an export folder")
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KlstoreError(f"{folder} is not a klstore export (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise KlstoreError(f"{path}: not readable JSON ({first_line(exc)})") from None
    if not isinstance(manifest, dict) or manifest.get("klstore_export") != FORMAT:
        raise KlstoreError(f"{path}: not a klstore export manifest of format {FORMAT}")
    try:
        check_label(manifest["run_id"], "run id")
        checksums = manifest["checksums"]
        for relative, record in checksums.items():
            _check_relative(relative)
            if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
                raise KlstoreError(f"{path}: the record of {relative!r} is not a record")
        for table, entries in manifest["tables"].items():
            if table not in TABLES and table != LENS_TOKENS:
                raise KlstoreError(f"{path}: unknown table {table!r}")
            for entry in entries:
                _check_entry(manifest["run_id"], table, entry, checksums)
        for lens_id, names in manifest["lens_files"].items():
            if not is_lens_id(lens_id) or not all(_FILE_NAME.match(n) for n in names):
                raise KlstoreError(f"{path}: lens {lens_id!r} is not a lens id with plain file names")
            for name in names:
                if f"{LENS_FILES}/{lens_id}/{name}" not in checksums:
                    raise KlstoreError(f"{path}: {LENS_FILES}/{lens_id}/{name} has no record")
    except (KeyError, TypeError, AttributeError) as exc:
        raise KlstoreError(f"{path}: not a klstore export manifest ({type(exc).__name__}: {exc})") from None
    return manifest


def _check_relative(relative: str) -> None:
    parts = relative.split("/")
    if not all(_FILE_NAME.match(part) for part in parts):
        raise KlstoreError(f"{MANIFEST}: {relative!r} is not a plain path inside the export")


def _check_entry(run_id: str, table: str, entry: dict, checksums: dict) -> None:
    keys = TABLES[table if table != LENS_TOKENS else "kl"][1]
    partition, name = entry["partition"], entry["name"]
    if sorted(partition) != sorted(keys) or not _FILE_NAME.match(name):
        raise KlstoreError(f"{MANIFEST}: {table} entry {entry['path']!r} names no {table} partition and file")
    for key, value in partition.items():
        check_label(value, key)
    if "run_id" in keys and partition["run_id"] != run_id:
        raise KlstoreError(f"{MANIFEST}: {entry['path']!r} belongs to run {partition['run_id']!r}, not {run_id}")
    if entry["path"] != data_path(table, partition, name) or entry["path"] not in checksums:
        raise KlstoreError(f"{MANIFEST}: {entry['path']!r} is not where an export puts that file, or has no record")
