"""`klstore import DIR`: an exported run (store/dataset.py) into a store, under its run id.

Every file is checked against the manifest before anything is written; the run's files are
written into `<store>/_import/<uuid>/` through the store's one writer, then moved into place
(the `runs` row last); a failure removes what it moved, so the store is as before
(docs/dataset.md, "Import"). This module never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from klstore.errors import KlstoreError
from klstore.store.dataset import (
    DATA,
    IMPORT_STAGING,
    LENS_FILES,
    LENS_TOKENS,
    MANIFEST,
    RUN_TABLES,
    partition_of,
    read_manifest,
    record_of,
    to_store_rows,
)
from klstore.store.integrity import recover, visible
from klstore.store.tables import RECORD_SUFFIX, Store, open_store


def verify_export(folder: str | Path) -> dict:
    """Check every file of an export against its record, and that no data or lens file is
    unlisted; returns the manifest. The first problem is a one-line error naming the file."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for relative, record in sorted(manifest["checksums"].items()):
        path = folder / relative
        if not path.is_file():
            raise KlstoreError(f"{path}: missing (listed in {MANIFEST}); nothing imported")
        digest = hashlib.sha256()
        size = 0
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(16 * 2**20), b""):
                digest.update(block)
                size += len(block)
        if size != record.get("bytes") or digest.hexdigest() != record["sha256"]:
            raise KlstoreError(f"{path}: checksum mismatch (differs from its record in {MANIFEST}); nothing imported")
    for top in (DATA, LENS_FILES):
        for path in sorted((folder / top).rglob("*")) if (folder / top).is_dir() else []:
            relative = path.relative_to(folder).as_posix()
            if path.is_file() and relative not in manifest["checksums"]:
                raise KlstoreError(f"{path}: not listed in {MANIFEST} (added after the export?); nothing imported")
    return manifest


# ------------------------------------------------------------------- import
def import_run(store_uri: Store | str, folder: str | Path, log=lambda message: None) -> dict:
    """Bring an exported run into a store under its own run id (see the module docstring).

    Every file is checked first; a run already in the store (its `runs` row) is an error, and so
    is another vocabulary under one of its model labels or a damaged lens of the same id.
    Leftovers of an interrupted import of this run (its files without its `runs` row) are
    replaced. Returns {"run_id", "store", "rows": {table: rows}, "files": n}."""
    folder = Path(folder).expanduser().absolute()
    manifest = verify_export(folder)
    run_id = manifest["run_id"]
    store = open_store(store_uri, create=True)
    recover(store, log)
    planned = _plan_import(store, folder, manifest)
    staging = store.path(IMPORT_STAGING, uuid.uuid4().hex)
    moved: list[str] = []
    try:
        staged = []
        for relative, final, table, entry in planned:
            stage = f"{staging}/{relative}"
            if table is None:  # a lens file
                data = (folder / entry).read_bytes()
                store.put_bytes(stage, data)
                store.put_bytes(stage + RECORD_SUFFIX, json.dumps(record_of(data), sort_keys=True).encode())
            else:
                exported = pq.read_table(folder / entry["path"])
                _check_partition(folder / entry["path"], entry, exported)
                rows = to_store_rows(table, exported, str(folder / entry["path"]))
                shards = manifest["checksums"][entry["path"]].get("shards") or []
                store.write_file(stage, rows, rows.schema, shards=shards)
            staged.append((stage, final))
        for stage, final in staged:
            store.move(stage, final)
            moved.append(final)
            store.move(stage + RECORD_SUFFIX, final + RECORD_SUFFIX)
            moved.append(final + RECORD_SUFFIX)
    except BaseException:
        for path in reversed(moved):
            store.delete(path)
        raise
    finally:
        _remove_staging(store, staging)
    rows = {
        table: sum(manifest["checksums"][e["path"]]["rows"] for e in entries)
        for table, entries in manifest["tables"].items()
        if table != LENS_TOKENS
    }
    return {"run_id": run_id, "store": store.uri, "rows": rows, "files": len(moved) // 2}


def _remove_staging(store: Store, staging: str) -> None:
    try:
        store.fs.delete_dir(staging)
    except (FileNotFoundError, OSError):
        pass
    parent = store.path(IMPORT_STAGING)
    if store.is_local and os.path.isdir(parent) and not os.listdir(parent):
        os.rmdir(parent)


def _check_partition(path: Path, entry: dict, rows: pa.Table) -> None:
    """The rows of an exported file hold the partition its manifest entry names."""
    import pyarrow.compute as pc

    for key, value in entry["partition"].items():
        if key in rows.column_names and rows.num_rows:
            values = pc.unique(rows.column(key)).to_pylist()
            if values != [value]:
                raise KlstoreError(f"{path}: column {key} holds {values[:3]}, not {value!r} as {MANIFEST} says")


def _plan_import(store: Store, folder: Path, manifest: dict) -> list[tuple[str, str, str | None, Any]]:
    """(staging path relative to the staging folder, final path, table or None for a lens file,
    manifest entry or lens file path) for every file to write, `runs` last; one-line errors for
    a run already there, a model label with another vocabulary, a lens id with other files."""
    run_id = manifest["run_id"]
    root = store.root.rstrip("/") + "/"
    runs_file = f"{store.table_dir('runs', run_id=run_id)}/run.parquet"
    if store.exists_file(runs_file):
        raise KlstoreError(f"run {run_id} is already in store {store.uri}; nothing imported")
    planned: list[tuple[str, str, str | None, Any]] = []
    order = [t for t in ("kl", "generations", "shards", "tokens", "prompts", "runs") if t in manifest["tables"]]
    for table in order:
        for entry in manifest["tables"][table]:
            final = f"{store.table_dir(table, **entry['partition'])}/{entry['name']}"
            if table == "tokens":
                present = visible(store, "tokens")
                mine = [p for p in present if p.rsplit("/", 1)[0] == final.rsplit("/", 1)[0]]
                if final in mine:
                    continue  # the same vocabulary (its file is named by the texts' hash)
                if mine:
                    raise KlstoreError(
                        f"model label {entry['partition']['model']!r} has another vocabulary in store "
                        f"{store.uri} ({mine[0]}); nothing imported"
                    )
            planned.append((final[len(root) :], final, table, entry))
    names = {final for _, final, table, _ in planned if table in RUN_TABLES}
    for table in RUN_TABLES:
        for path in visible(store, table):
            if partition_of(store, table, path).get("run_id") == run_id and path not in names:
                raise KlstoreError(f"run {run_id} already has files in store {store.uri} ({path}); nothing imported")
    for lens_id, files in sorted(manifest["lens_files"].items()):
        for name in files:
            relative = f"{LENS_FILES}/{lens_id}/{name}"
            final = store.path(LENS_FILES, lens_id, name)
            data = store.read_bytes(final)
            if data is not None:
                if hashlib.sha256(data).hexdigest() != manifest["checksums"][relative]["sha256"]:
                    raise KlstoreError(f"lens {lens_id} in store {store.uri} differs from the export's ({final})")
                continue
            planned.insert(0, (relative, final, None, relative))
    return planned
