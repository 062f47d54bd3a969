"""Store integrity: file records, crash-safe compaction, and quarantine.

Every row is kept exactly once, and every stored number is the one written.

**Records.** Each Parquet file has a sidecar `<file>.sha256.json` with its SHA-256,
row count, size and the shard keys it holds (written by `Store.write_file`). Files
carry Parquet page checksums too. `verify` compares each file with its record.

**Compaction journal.** Merging a partition's files is several file operations, so a
small journal (`<partition>/_compaction.json`) says which files count while it runs:

    1. journal {state: started, sources, target}   readers: the sources
    2. write <target>.pending (+ its record)        readers: the sources
    3. journal {state: merged}                     readers: the merged file
    4. delete the sources (and their records)      readers: the merged file
    5. rename <target>.pending -> <target>         readers: the merged file
    6. delete the journal                          readers: the plain *.parquet files

klstore's readers (views, reports, verify, resume) follow the journal, so they see
every row exactly once at every instant. Plain readers of `**/*.parquet` never see a
row twice (the merged file is invisible to them until its sources are gone), but may
miss a partition's rows between steps 4 and 5. The next klstore command that writes
or verifies finishes an interrupted compaction after step 3 and undoes one before it
(`recover`). Decision and alternatives (a Delta Lake log): docs/store-integrity.md.
"""

from __future__ import annotations

import json
import os
import socket
import time

from klstore.errors import KlstoreError, first_line
from klstore.store.tables import JOURNAL_NAME, PENDING_SUFFIX, QUARANTINE_DIR, RECORD_SUFFIX, TABLES, TMP_MARK, Store

STALE_JOURNAL_S = 3600.0  # a journal from another machine older than this is an interrupted compaction


# ------------------------------------------------------------------ records
def read_record(store: Store, path: str) -> dict | None:
    data = store.read_bytes(path + RECORD_SUFFIX)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return {"corrupt": True}


def file_sha256(store: Store, path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with store.fs.open_input_stream(path) as handle:
        while True:
            block = handle.read(16 * 2**20)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ journals
def _journals(store: Store, table: str) -> list[str]:
    return store.files(table, suffix="/" + JOURNAL_NAME)


def _read_journal(store: Store, path: str) -> dict | None:
    data = store.read_bytes(path)
    return None if data is None else json.loads(data)


def in_partition(store: Store, table: str, path: str) -> bool:
    """Whether `path` lies where the table's readers look: exactly one folder per partition key,
    in order (`kl/model=<m>/probe=<p>/run_id=<r>/<file>`). A value klstore would not write (a
    folder renamed by hand) still reads as data; verify names such folders."""
    _, keys = TABLES[table]
    base = store.path(table).rstrip("/") + "/"
    if not path.startswith(base):
        return False
    folders = path[len(base) :].split("/")[:-1]
    return len(folders) == len(keys) and all(
        folder.partition("=")[0] == key and folder.partition("=")[2] for key, folder in zip(keys, folders)
    )


def unpartitioned(store: Store, table: str) -> list[str]:
    """Parquet files in a table's folder outside its partition folders (see `in_partition`):
    klstore never writes them (e.g. a file copied in by hand), and no reader counts them."""
    return [path for path in store.files(table) if not in_partition(store, table, path)]


def stray_message(table: str, path: str) -> str:
    """One line naming a file outside the table's partition folders."""
    _, keys = TABLES[table]
    layout = "/".join(f"{key}=..." for key in keys)
    return f"{path} is a stray file, not in a {table}/{layout} partition folder (klstore never writes it there)"


def visible(store: Store, table: str) -> list[str]:
    """The files that hold the table's rows right now (see the module docstring); files outside
    the partition folders never count (`unpartitioned`: readers name them, verify moves them)."""
    files = [path for path in store.files(table) if in_partition(store, table, path)]
    for path in _journals(store, table):
        journal = _read_journal(store, path)
        if not journal or journal.get("state") != "merged":
            continue  # started: the sources count; the pending file is not *.parquet
        folder = path.rsplit("/", 1)[0]
        sources = {f"{folder}/{name}" for name in journal["sources"]}
        files = [f for f in files if f not in sources]
        pending = f"{folder}/{journal['target']}{PENDING_SUFFIX}"
        if store.exists_file(pending):
            files.append(pending)
    return sorted(files)


def _live(journal: dict) -> bool:
    """Whether the compaction that wrote this journal may still be running."""
    if journal.get("host") == socket.gethostname():
        pid = journal.get("pid")
        if pid is None or pid == os.getpid():
            return False
        try:
            os.kill(int(pid), 0)
            return True
        except (OSError, TypeError, ValueError):
            return False
    return time.time() - float(journal.get("at", 0)) < STALE_JOURNAL_S


def recover(store: Store, log=lambda message: None) -> int:
    """Finish (after `merged`) or undo (before it) every interrupted compaction. Returns how many."""
    done = 0
    for table in TABLES:
        for path in _journals(store, table):
            journal = _read_journal(store, path)
            if journal is None or _live(journal):
                continue
            folder = path.rsplit("/", 1)[0]
            pending = f"{folder}/{journal['target']}{PENDING_SUFFIX}"
            final = f"{folder}/{journal['target']}"
            if journal.get("state") == "merged":
                for name in journal["sources"]:
                    if f"{folder}/{name}" != final:
                        store.delete(f"{folder}/{name}")
                        store.delete(f"{folder}/{name}{RECORD_SUFFIX}")
                if store.exists_file(pending + RECORD_SUFFIX):
                    store.move(pending + RECORD_SUFFIX, final + RECORD_SUFFIX)
                if store.exists_file(pending):
                    store.move(pending, final)
                log(f"finished an interrupted compaction of {folder}")
            else:
                store.delete(pending)
                store.delete(pending + RECORD_SUFFIX)
                log(f"undid an interrupted compaction of {folder}")
            store.delete(path)
            done += 1
    return done


# ---------------------------------------------------------------- compaction
def _read_part(store: Store, path: str, schema):
    import pyarrow as pa
    import pyarrow.parquet as pq

    part = pq.read_table(path, filesystem=store.fs, partitioning=None)
    for field in schema:
        if field.name not in part.column_names:  # an older schema
            part = part.append_column(field.name, pa.nulls(len(part), field.type))
    return part.select(schema.names).cast(schema)


def compact(store: Store, min_files: int = 2, log=lambda message: None) -> list[tuple[str, int]]:
    """Merge each partition's files into one, through the journal; returns (folder, files merged).

    A partition holding an unreadable file is left as it is (and named in the log):
    `klstore verify --quarantine` first.
    """
    import pyarrow as pa

    from klstore.store.tables import work_key

    recover(store, log)
    done = []
    for table, (schema, _) in TABLES.items():
        if table == "runs":
            continue  # one file per run already
        folders: dict[str, list[str]] = {}
        for path in visible(store, table):
            folders.setdefault(path.rsplit("/", 1)[0], []).append(path)
        for folder, paths in sorted(folders.items()):
            if len(paths) < min_files or store.exists_file(f"{folder}/{JOURNAL_NAME}"):
                continue
            try:
                parts = [_read_part(store, path, schema) for path in paths]
            except (OSError, pa.ArrowInvalid) as exc:
                log(f"skipped {folder}: an unreadable file ({first_line(exc)}); run `klstore verify --quarantine`")
                continue
            shards = sorted({key for path in paths for key in _shards_of(store, path)})
            names = [p.rsplit("/", 1)[-1] for p in paths]
            target = f"compact-{work_key(*names)}.parquet"
            _compact_partition(store, folder, names, target, parts, schema, shards)
            done.append((folder, len(paths)))
    return done


def _shards_of(store: Store, path: str) -> list[str]:
    name = path.rsplit("/", 1)[-1]
    if name.startswith("part-"):
        return [name[len("part-") :].split(".", 1)[0]]
    record = read_record(store, path)
    return list((record or {}).get("shards") or [])


def _compact_partition(store: Store, folder: str, names: list[str], target: str, parts, schema, shards) -> None:
    import pyarrow as pa

    journal_path = f"{folder}/{JOURNAL_NAME}"
    journal = {
        "state": "started",
        "sources": names,
        "target": target,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "at": time.time(),
    }
    store.put_bytes(journal_path, json.dumps(journal).encode())
    merged = pa.concat_tables(parts)
    merged = merged.sort_by(
        [
            (c, "ascending")
            for c in ("prompt_id", "layer", "gen_idx", "started_at", "shard_key", "token_id")
            if c in schema.names
        ]
    )
    pending = f"{folder}/{target}{PENDING_SUFFIX}"
    store.write_file(pending, merged, schema, shards=shards)
    store.put_bytes(journal_path, json.dumps({**journal, "state": "merged"}).encode())
    final = f"{folder}/{target}"
    for name in names:
        if f"{folder}/{name}" != final:
            store.delete(f"{folder}/{name}")
            store.delete(f"{folder}/{name}{RECORD_SUFFIX}")
    store.move(pending + RECORD_SUFFIX, final + RECORD_SUFFIX)
    store.move(pending, final)
    store.delete(journal_path)


# ----------------------------------------------------------------- checking
def check_file(store: Store, path: str, record: dict | None) -> str | None:
    """What is wrong with one file, or None. With a record, its SHA-256 decides (fast);
    without one, the footer and every page checksum are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if record is not None and not record.get("corrupt"):
        size = store.fs.get_file_info(path).size
        if size != record.get("bytes"):
            return f"size {size} differs from its record ({record.get('bytes')} bytes)"
        if file_sha256(store, path) != record.get("sha256"):
            return "content differs from its record (SHA-256 mismatch)"
        return None
    try:
        with store.fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle, page_checksum_verification=True)
            for group in range(parquet.num_row_groups):
                parquet.read_row_group(group)
    except (OSError, pa.ArrowInvalid, pa.ArrowException, ValueError) as exc:
        return f"unreadable: {first_line(exc)}"
    return None if record is None else "its record is not valid JSON"


def quarantine(store: Store, paths: list[str]) -> list[str]:
    """Move files (and their records) to <store>/_quarantine/<time>/<same path>; never deletes."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    moved = []
    root = store.root.rstrip("/")
    for path in paths:
        relative = path[len(root) + 1 :] if path.startswith(root + "/") else path.lstrip("/")
        target = store.path(QUARANTINE_DIR, stamp, relative)
        for source, dest in ((path, target), (path + RECORD_SUFFIX, target + RECORD_SUFFIX)):
            if store.exists_file(source):
                store.move(source, dest)
        moved.append(target)
    return moved


def stray_files(store: Store, table: str) -> list[str]:
    """Temporary files left by a crash (`*.tmp-*`), outside any running compaction."""
    return [p for p in store.files(table, suffix="") if TMP_MARK in p.rsplit("/", 1)[-1]]


def missing_or_unrecorded(store: Store, table: str) -> tuple[list[str], list[str]]:
    """(records whose file is missing, files with no record)."""
    files = set(store.files(table)) - set(unpartitioned(store, table))
    pendings = {p for p in store.files(table, suffix=PENDING_SUFFIX)}
    records = store.files(table, suffix=RECORD_SUFFIX)
    orphans = [r for r in records if r[: -len(RECORD_SUFFIX)] not in files | pendings]
    unrecorded = [f for f in sorted(files) if f + RECORD_SUFFIX not in set(records)]
    return orphans, unrecorded


def record_files(store: Store, paths: list[str]) -> int:
    """Write records for files that have none (stores written before records existed),
    after checking that each is readable with its page checksums."""
    import hashlib

    import pyarrow.parquet as pq

    written = 0
    for path in paths:
        problem = check_file(store, path, None)
        if problem:
            raise KlstoreError(f"{path}: {problem}; not recorded (run `klstore verify --quarantine`)")
        data = store.read_bytes(path)
        if data is None:
            raise KlstoreError(f"{path}: gone since its check; not recorded")
        with store.fs.open_input_file(path) as handle:
            rows = pq.ParquetFile(handle).metadata.num_rows
        record = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "rows": rows,
            "bytes": len(data),
            "shards": _shards_of(store, path),
        }
        store.put_bytes(path + RECORD_SUFFIX, json.dumps(record, sort_keys=True).encode())
        written += 1
    return written


def shards_present(store: Store, table: str, **partitions: str) -> set[str] | None:
    """The shard keys whose rows a partition holds (file names part-<key>, and the records of
    compacted files); None when a compacted file has no record (a store from before records)."""
    folder = store.table_dir(table, **partitions)
    keys: set[str] = set()
    for path in visible(store, table):
        if path.rsplit("/", 1)[0] != folder:
            continue
        name = path.rsplit("/", 1)[-1]
        if name.startswith("part-"):
            keys.add(name[len("part-") :].split(".", 1)[0])
            continue
        record = read_record(store, path)
        if record is None or "shards" not in record:
            return None
        keys.update(record["shards"])
    return keys
