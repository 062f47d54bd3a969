"""The results store: Hive-partitioned Parquet, one explicit schema per table.

Layout (a local folder or an `s3://bucket/prefix`):

    <store>/kl/model=<m>/probe=<p>/run_id=<r>/part-<key>.parquet
    <store>/generations/model=<m>/run_id=<r>/part-<key>.parquet
    <store>/prompts/model=<m>/run_id=<r>/part-<key>.parquet
    <store>/runs/run_id=<r>/run.parquet
    <store>/shards/model=<m>/run_id=<r>/attempt-<key>-<uuid8>.parquet
    <store>/tokens/model=<m>/vocab-<sha256 of the texts, 16 hex>.parquet

Partition columns (model, probe, run_id) live in the paths only. `<key>` is
derived from the unit of work (the prompt ids of a shard), so redoing the same
work replaces a file instead of adding rows. The `shards` table is the exception: one
file per shard attempt (a uuid in its name), so every attempt stays on record; it is
provenance (where, when, how fast) and takes no part in resume. A local file is written under a
temporary name (`*.tmp-<uuid>`, never matched by `*.parquet`) and renamed into
place; an S3 object becomes visible only when its upload completes.
This module never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from klstore.errors import KlstoreError, StoreWriteError, first_line
from klstore.spec import DEFAULT_STORE, DIVERGENCES, check_label

# ---------------------------------------------------------------- schemas
KL_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt_group", pa.string()),
        ("layer", pa.int16()),
        ("gen_idx", pa.int16()),
        *[(name, pa.float32()) for name in DIVERGENCES],  # null where not asked for
        ("top1_match", pa.bool_()),
        ("n_layers", pa.int16()),
        # lens tokens (docs/conventions.md); null in files written before them, or with topk = 0
        ("topk_ids", pa.list_(pa.int32())),  # the top-k tokens of Q, rank 1 first
        ("topk_probs", pa.list_(pa.float32())),  # their probabilities under Q
        ("gen_rank", pa.int32()),  # rank of the generated token under Q (1 = top)
        ("gen_logq", pa.float32()),  # log Q(generated token)
        # which lens read the row (docs/conventions.md, "Lenses"): its kind, and for a fitted lens
        # the content hash of its parameters; files written before lenses read as `logit`
        ("lens", pa.string()),
        ("lens_id", pa.string()),
        # H(Q) of the row's read-out, nats (docs/conventions.md, "Entropy of Q"); null before it
        ("q_entropy", pa.float32()),
    ]
)
TOKENS_SCHEMA = pa.schema(
    [  # each model's vocabulary, once per model (joined by the lens_tokens view)
        ("token_id", pa.int32()),
        ("token_text", pa.string()),
    ]
)
GENERATIONS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt_group", pa.string()),
        ("gen_idx", pa.int16()),
        ("token_id", pa.int32()),
        ("token_text", pa.string()),
        ("logprob", pa.float32()),
        ("entropy", pa.float32()),
    ]
)
PROMPTS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt_group", pa.string()),
        ("prompt_text", pa.string()),
        ("source_text", pa.string()),
        ("n_prompt_tokens", pa.int32()),
        ("n_generated", pa.int32()),
        ("stopped_at_eos", pa.bool_()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)
RUNS_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("updated_at", pa.timestamp("us", tz="UTC")),
        ("status", pa.string()),
        ("config", pa.string()),
        ("klstore_version", pa.string()),
        ("torch_version", pa.string()),
        ("transformers_version", pa.string()),
        ("noise_floor", pa.float32()),  # max |divergence(batched) - divergence(alone)| over the sampled cells
    ]
)
SHARDS_SCHEMA = pa.schema(
    [  # one row per shard attempt (provenance; never used for resume)
        ("shard_key", pa.string()),
        ("node", pa.string()),  # the host name; under Ray "<host>/<node id[:12]>" (nodes can share a host)
        ("actor", pa.string()),  # the Ray actor id, or "local" (klstore compute --store, the Python API)
        ("device", pa.string()),  # cpu, cuda:0, ...
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("ended_at", pa.timestamp("us", tz="UTC")),
        ("prompts", pa.int32()),
        ("cells", pa.int32()),  # kl rows computed (every probe); null when the attempt did not finish
        ("cells_per_second", pa.float32()),
        ("outcome", pa.string()),  # ok, failed (an error in the shard), lost (its actor died)
        ("error", pa.string()),
        ("noise_floor", pa.float32()),  # measured on this attempt's first prompt, else null (docs/conventions.md)
        ("fingerprint", pa.string()),  # the model fingerprint (docs/conventions.md, "Lenses"); null before lenses
    ]
)

LENSES_SCHEMA = pa.schema(
    [  # one row per fitted lens (docs/conventions.md, "Lenses"); its files: <store>/lens_files/<lens_id>/
        ("lens_id", pa.string()),  # the content hash of its parameters
        ("kind", pa.string()),  # tuned, least_squares, jacobian
        ("model_name", pa.string()),  # what was loaded (a path, a hub id, a built-in name)
        ("fingerprint", pa.string()),  # the model fingerprint the lens is tied to
        ("unembed_hash", pa.string()),  # tuned-lens's hash of the unembedding
        ("corpus", pa.string()),  # the corpus as configured
        ("corpus_hash", pa.string()),  # SHA-256 of the training split's token ids
        ("held_out_hash", pa.string()),  # SHA-256 of the held-out split's token ids
        ("recipe", pa.string()),  # JSON: kind, init, optimizer and schedule
        ("tokens", pa.int64()),  # training tokens seen
        ("wall_s", pa.float64()),  # the fit's wall time, model loads included
        ("workers", pa.int32()),
        ("final_loss", pa.float64()),  # the last step's training loss (null: one-pass fits)
        ("fit_id", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
LENS_EVAL_SCHEMA = pa.schema(
    [  # per lens and layer, on a held-out split: how close its read-out is to the model's output
        ("lens_id", pa.string()),  # `logit` for the logit lens
        ("lens", pa.string()),  # the kind
        ("layer", pa.int16()),
        ("kl", pa.float64()),  # mean KL(final || lens read-out) over the tokens, nats
        ("top1_agreement", pa.float64()),  # share of tokens where argmax Q = argmax of the final distribution
        ("tokens", pa.int64()),
        ("held_out_hash", pa.string()),
        ("fingerprint", pa.string()),
        ("fit_id", pa.string()),
    ]
)

# table -> (file schema, partition columns in path order)
TABLES = {
    "kl": (KL_SCHEMA, ("model", "probe", "run_id")),
    "generations": (GENERATIONS_SCHEMA, ("model", "run_id")),
    "prompts": (PROMPTS_SCHEMA, ("model", "run_id")),
    "runs": (RUNS_SCHEMA, ("run_id",)),
    "shards": (SHARDS_SCHEMA, ("model", "run_id")),
    "tokens": (TOKENS_SCHEMA, ("model",)),
    "lenses": (LENSES_SCHEMA, ("model",)),
    "lens_eval": (LENS_EVAL_SCHEMA, ("model",)),
}
# the columns of each view, in the documented order
VIEW_COLUMNS = {
    "kl": (
        "run_id",
        "model",
        "probe",
        "prompt_id",
        "prompt_group",
        "layer",
        "gen_idx",
        *DIVERGENCES,
        "top1_match",
        "n_layers",
        "topk_ids",
        "topk_probs",
        "gen_rank",
        "gen_logq",
        "lens",
        "lens_id",
        "q_entropy",
    ),
    "generations": (
        "run_id",
        "model",
        "prompt_id",
        "prompt_group",
        "gen_idx",
        "token_id",
        "token_text",
        "logprob",
        "entropy",
    ),
    "prompts": (
        "run_id",
        "model",
        "prompt_id",
        "prompt_group",
        "prompt_text",
        "source_text",
        "n_prompt_tokens",
        "n_generated",
        "stopped_at_eos",
        "status",
        "error",
    ),
    "runs": (
        "run_id",
        "name",
        "created_at",
        "updated_at",
        "status",
        "config",
        "klstore_version",
        "torch_version",
        "transformers_version",
        "noise_floor",
    ),
    "shards": (
        "run_id",
        "model",
        "shard_key",
        "node",
        "actor",
        "device",
        "started_at",
        "ended_at",
        "prompts",
        "cells",
        "cells_per_second",
        "outcome",
        "error",
        "noise_floor",
        "fingerprint",
    ),
    "tokens": ("model", "token_id", "token_text"),
    "lenses": ("model", *LENSES_SCHEMA.names),
    "lens_eval": ("model", *LENS_EVAL_SCHEMA.names),
}
# what a view column reads as where its files have none (written before the column existed)
VIEW_DEFAULTS = {"kl": {"lens": "logit", "lens_id": "logit"}}
ATTEMPT_PREFIX = "attempt-"  # shards files: attempt-<shard key>-<uuid8>.parquet
FLOAT_COLUMNS = (*DIVERGENCES, "logprob", "entropy", "gen_logq", "q_entropy")
TMP_MARK = ".tmp-"
RECORD_SUFFIX = ".sha256.json"  # beside every file: {"sha256", "rows", "bytes", "shards"}
PENDING_SUFFIX = ".pending"  # a compaction's merged file before it replaces its sources
JOURNAL_NAME = "_compaction.json"  # a partition's compaction in progress (store/integrity.py)
QUARANTINE_DIR = "_quarantine"  # where `verify --quarantine` moves bad files (never deleted)


def parquet_options(schema: pa.Schema) -> dict:
    """Writer settings for every klstore file: zstd, dictionaries, byte-stream-split floats.

    Float columns (and lists of floats, by their leaf path `<name>.list.element`) are written
    byte-stream-split instead of dictionary-encoded: float mantissas rarely repeat, and split
    bytes compress (lens-token probabilities: 7.9 -> 4.9 bytes per (cell, rank) row)."""
    floats = [c for c in schema.names if c in FLOAT_COLUMNS]
    float_lists = [f.name for f in schema if pa.types.is_list(f.type) and pa.types.is_floating(f.type.value_type)]
    split = {
        **{c: "BYTE_STREAM_SPLIT" for c in floats},
        **{f"{c}.list.element": "BYTE_STREAM_SPLIT" for c in float_lists},
    }
    dictionary = [c for c in schema.names if c not in floats and c not in float_lists]
    return dict(
        compression="zstd",
        compression_level=6,
        use_dictionary=dictionary,
        use_byte_stream_split=False,
        column_encoding=split or None,
        write_statistics=True,
        write_page_checksum=True,
    )


def work_key(*parts: str) -> str:
    """Deterministic file key for a unit of work."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:20]


# ------------------------------------------------------------- the store
@dataclass(frozen=True)
class Store:
    """A store root: `fs` is a pyarrow FileSystem, `root` the path inside it."""

    uri: str
    fs: Any  # pyarrow.fs.FileSystem (pyarrow has no type stubs)
    root: str

    @property
    def is_local(self) -> bool:
        return not self.uri.startswith("s3://")

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def table_dir(self, table: str, **partitions: str) -> str:
        _, keys = TABLES[table]
        parts = [table] + [f"{key}={check_label(partitions[key], key)}" for key in keys]
        return self.path(*parts)

    # ---------------------------------------------------------- writing
    def write(self, table: str, rows: pa.Table, filename: str, **partitions: str) -> str:
        """Write one complete file into the partition; replaces a file of the same name."""
        schema, _ = TABLES[table]
        final = f"{self.table_dir(table, **partitions)}/{filename}"
        self.write_file(final, rows.select(schema.names).cast(schema), schema)
        return final

    def write_file(self, final: str, rows: pa.Table, schema: pa.Schema, shards=None) -> None:
        """The one Parquet write of klstore: the file (with page checksums), then its record
        (`<final>.sha256.json`: SHA-256, rows, bytes, and the shard keys it holds).

        The file is complete at `final` or not there at all (see `put_bytes`). A crash
        between the two writes leaves a file whose record is missing or stale: `verify`
        names it and `verify --quarantine` moves it aside, so its shards are recomputed.
        """
        import hashlib

        sink = pa.BufferOutputStream()
        pq.write_table(rows, sink, **parquet_options(schema))
        data = sink.getvalue().to_pybytes()
        name = final.rsplit("/", 1)[-1]
        if shards is None and name.startswith("part-"):
            shards = [name[len("part-") :].split(".", 1)[0]]
        record = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "rows": rows.num_rows,
            "bytes": len(data),
            "shards": list(shards or []),
        }
        self.put_bytes(final, data)
        self.put_bytes(final + RECORD_SUFFIX, json.dumps(record, sort_keys=True).encode())

    # ------------------------------------------ file operations (fault-injection points)
    def put_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file atomically. Locally under a unique temporary name
        (`<path>.tmp-<uuid>`, which no `*.parquet` glob matches) renamed into place;
        on S3 an object appears only when its upload completes."""
        try:
            if not self.is_local:
                with self.fs.open_output_stream(path) as out:
                    out.write(data)
                return
            os.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as out:
                    out.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as exc:
            raise StoreWriteError(f"cannot write {path}: {exc.strerror or first_line(exc)}") from None

    def read_bytes(self, path: str) -> bytes | None:
        """A whole file, or None when it does not exist."""
        try:
            with self.fs.open_input_stream(path) as handle:
                return handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            if "not found" in str(exc).lower() or "no such file" in str(exc).lower():
                return None
            raise

    def delete(self, path: str) -> None:
        """Delete a file; a missing one is not an error (deletes are retried by recovery)."""
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if "not found" in str(exc).lower() or "no such file" in str(exc).lower():
                return
            raise StoreWriteError(f"cannot delete {path}: {exc.strerror or first_line(exc)}") from None

    def move(self, source: str, target: str) -> None:
        """Rename a file (locally atomic; on S3 a copy, then a delete of the source)."""
        try:
            if not self.is_local:
                self.fs.copy_file(source, target)
                self.fs.delete_file(source)
                return
            os.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            os.replace(source, target)
        except OSError as exc:
            raise StoreWriteError(f"cannot move {source} to {target}: {exc.strerror or first_line(exc)}") from None

    def exists_file(self, path: str) -> bool:
        from pyarrow import fs as pafs

        return self.fs.get_file_info(path).type == pafs.FileType.File

    def write_run(
        self,
        run_id: str,
        name: str,
        status: str,
        config: dict,
        versions: dict[str, str],
        noise_floor: float | None = None,
    ) -> None:
        """Create or update the run's row, keeping its original created_at."""
        now = datetime.now(timezone.utc)
        existing = self.read_run(run_id)
        created = existing["created_at"] if existing else now
        row = {
            "name": [name],
            "created_at": [created],
            "updated_at": [now],
            "status": [status],
            "config": [json.dumps(config, sort_keys=True)],
            "klstore_version": [versions.get("klstore")],
            "torch_version": [versions.get("torch")],
            "transformers_version": [versions.get("transformers")],
            "noise_floor": [noise_floor],
        }
        self.write("runs", pa.table(row, schema=RUNS_SCHEMA), "run.parquet", run_id=run_id)

    def read_run(self, run_id: str) -> dict | None:
        path = f"{self.table_dir('runs', run_id=run_id)}/run.parquet"
        try:
            table = pq.read_table(path, filesystem=None if self.is_local else self.fs)
        except (FileNotFoundError, OSError, pa.ArrowInvalid):
            return None  # none yet, or unreadable (verify names it): the row is rewritten
        rows = table.to_pylist()
        return rows[0] if rows else None

    # ---------------------------------------------------------- listing
    def files(self, table: str, suffix: str = ".parquet") -> list[str]:
        """Paths of a table's files ending in `suffix` ('' for every file)."""
        from pyarrow import fs as pafs

        selector = pafs.FileSelector(self.path(table), recursive=True, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File and info.path.endswith(suffix):
                out.append(info.path)
        return sorted(out)

    def partition_files(self, table: str, suffix: str = ".parquet", **partitions: str) -> list[str]:
        """Paths of the files ending in `suffix` in one partition folder (e.g. one model's run)."""
        from pyarrow import fs as pafs

        selector = pafs.FileSelector(self.table_dir(table, **partitions), allow_not_found=True)
        return sorted(
            info.path
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.path.endswith(suffix)
        )

    def exists(self) -> bool:
        from pyarrow import fs as pafs

        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory


def open_store(uri: str | Store | None = None, create: bool = False) -> Store:
    """Open a store by path or s3:// URI. Reading a missing store is an error; writing creates it.

    S3: credentials and region from the usual AWS environment variables;
    AWS_ENDPOINT_URL (or KLSTORE_S3_ENDPOINT) points at an S3-compatible service.
    """
    from pyarrow import fs as pafs

    if isinstance(uri, Store):
        return uri
    uri = uri or DEFAULT_STORE
    if uri.startswith("s3://"):
        bucket_prefix = uri[len("s3://") :].strip("/")
        if not bucket_prefix:
            raise KlstoreError(f"store {uri!r}: no bucket")
        endpoint = os.environ.get("KLSTORE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        if endpoint:
            scheme, _, rest = endpoint.partition("://")
            kwargs.update(endpoint_override=rest or scheme, scheme=scheme if rest else "https")
        s3 = pafs.S3FileSystem(**kwargs)
        store = Store(uri, s3, bucket_prefix)
        if create:
            return store
        try:
            info = s3.get_file_info(pafs.FileSelector(bucket_prefix, allow_not_found=True))
        except OSError as exc:
            raise KlstoreError(f"store {uri}: {first_line(exc)}") from None
        if not info:
            raise KlstoreError(f"store {uri} does not exist (or is empty)")
        return store
    root = os.path.abspath(os.path.expanduser(uri))
    if create:
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise KlstoreError(f"cannot create store {uri}: {exc.strerror}") from None
        from klstore.config import write_problem

        if write_problem(root) is not None:
            raise KlstoreError(f"store {uri} is not writable")
    elif not os.path.isdir(root):
        raise KlstoreError(f"store {uri} does not exist")
    return Store(uri, pafs.LocalFileSystem(), root)
