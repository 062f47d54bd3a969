"""Lenses named by users -> lenses the engine can read, and lens files in a store.

A user names a lens as `logit`, a path (a tuned-lens lens folder or its params.pt), or the id
of a lens in the store. `resolve` turns each into a `LensSpec` with its kind and id (the
content hash of its parameters: what a run's identity and every kl row record) and a `source`
the engine reads it from. A lens in the store sits in `<store>/lens_files/<id>/` in the
tuned-lens format, each file with its checksum record beside it like every other store file;
for a store on S3 the files are copied into the local cache first.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from klstore.core import lenses
from klstore.errors import KlstoreError
from klstore.spec import DEFAULT_STORE, ComputeSpec, LensSpec, is_lens_id
from klstore.store.tables import RECORD_SUFFIX, Store, open_store

LENS_FILES = "lens_files"  # <store>/lens_files/<lens id>/{config.json, params.pt, klstore.json}
_FILES = (lenses.CONFIG_FILE, lenses.PARAMS_FILE, lenses.KLSTORE_FILE, lenses.JLENS_FILE)


def resolve(compute: ComputeSpec, store: Store | str | None = None) -> ComputeSpec:
    """`compute` with every lens resolved to its kind and id (a no-op for the logit lens). A
    path is read and hashed; a 16-hex id is looked up in `store`. One-line errors for a path
    that is not a lens and an id that is not in the store."""
    if all(lens.resolved for lens in compute.lens):
        return compute
    return compute.model_copy(update={"lens": tuple(resolve_one(lens, store) for lens in compute.lens)})


def store_for_ids(uri: str | None) -> str | None:
    """The store that lens ids name lenses in: `uri`, else the default store if it exists. Only
    a lens id opens it (never creating it), so a bad command still leaves no store behind."""
    if uri is None and not Path(DEFAULT_STORE).is_dir():
        return None
    return uri or DEFAULT_STORE


def resolve_one(lens: LensSpec, store: Store | str | None = None) -> LensSpec:
    if lens.resolved:
        return lens
    if Path(lens.source).exists() or not is_lens_id(lens.source):
        return lenses.resolve_path(lens)
    if store is None:
        raise KlstoreError(f"lens {lens.source} is a lens id, but no store was given to look it up in")
    folder = local_folder(open_store(store) if isinstance(store, str) else store, lens.source)
    loaded = lenses.load(folder)
    if loaded.id != lens.source:  # a file replaced or lost (klstore.json: a partial lens would read as whole)
        raise KlstoreError(
            f"lens {lens.source}: its files in the store now hold lens {loaded.id} (damaged or replaced)"
        )
    return LensSpec(kind=loaded.kind, id=loaded.id, source=str(folder))


def local_folder(store: Store, lens_id: str) -> Path:
    """The folder of lens `lens_id` in `store` on this machine (for S3, a checksummed copy in the
    local cache); a one-line error when the store has no such lens or its files are damaged."""
    base = store.path(LENS_FILES, lens_id)
    if store.read_bytes(f"{base}/{lenses.PARAMS_FILE}") is None:
        raise KlstoreError(f"lens {lens_id} is not in the store {store.uri} (see `klstore lens list`)")
    if store.is_local:
        folder = Path(base)
        for name in _FILES:
            _check_record(store, f"{base}/{name}", (folder / name).read_bytes() if (folder / name).exists() else None)
        return folder
    from klstore.core.models import cache_dir

    folder = cache_dir() / "lenses" / lens_id
    folder.mkdir(parents=True, exist_ok=True)
    for name in _FILES:
        data = store.read_bytes(f"{base}/{name}")
        _check_record(store, f"{base}/{name}", data)
        if data is not None:
            (folder / name).write_bytes(data)
    return folder


def _check_record(store: Store, path: str, data: bytes | None) -> None:
    record = store.read_bytes(path + RECORD_SUFFIX)
    if data is None and record is not None:
        raise KlstoreError(f"{path} is missing, but its checksum record is there (the lens's files are damaged)")
    if data is None or record is None:
        return
    expected = json.loads(record).get("sha256")
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise KlstoreError(f"{path}: checksum mismatch (the lens file was changed or damaged)")


def put(store: Store, folder: str | Path, lens_id: str) -> str:
    """Copy a written lens folder into the store, each file with its checksum record; returns
    the lens's folder in the store."""
    base = store.path(LENS_FILES, lens_id)
    for name in _FILES:
        path = Path(folder) / name
        if not path.exists():
            continue
        data = path.read_bytes()
        store.put_bytes(f"{base}/{name}", data)
        record = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        store.put_bytes(f"{base}/{name}{RECORD_SUFFIX}", json.dumps(record, sort_keys=True).encode())
    return base
