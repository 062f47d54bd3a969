"""The worker: one model copy that computes shards of prompts and writes them to the store.

A plain class with no Ray import: `klstore compute --store` uses it in-process,
and the runner wraps it in a Ray actor. `__init__` loads the model; `run_shard`
computes a shard and writes its rows straight into the store, then the attempt's
`shards` row (where it ran, when, how fast).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from klstore.errors import KlstoreError
from klstore.run.plan import shard_key, shard_parts
from klstore.spec import SPEED_MODES, ComputeSpec, check_label
from klstore.store.tables import Store

TOKENIZER_KEY = "klstore.tokenizer"  # Parquet metadata of a tokens file: tokenizer_fingerprint of its writer
_DECODE_METHODS = ("decode", "batch_decode", "_decode", "clean_up_tokenization")


def tokenizer_fingerprint(engine) -> str | None:
    """A hash of everything `engine.vocabulary()` reads, computed without decoding (milliseconds,
    against seconds for a 262k vocabulary), or None when that cannot be vouched for.

    It covers: the fast tokenizer's whole serialized state (`backend_tokenizer.to_str()`: model,
    added tokens, normalizer, decoder), the head size (ids decoded), the wrapper's clean-up flags,
    the transformers and tokenizers versions (the decode code) and the source of the engine's
    `vocabulary`. None for a slow or custom tokenizer, or one that overrides transformers' decode
    methods (state this hash would not see): the worker then decodes, as it always did."""
    import hashlib
    import inspect

    import tokenizers
    import transformers

    tokenizer = engine.tokenizer
    fast = transformers.PreTrainedTokenizerFast
    if not isinstance(tokenizer, fast) or any(
        getattr(type(tokenizer), method, None) is not getattr(fast, method) for method in _DECODE_METHODS
    ):
        return None
    try:
        state = tokenizer.backend_tokenizer.to_str()
        code = inspect.getsource(type(engine).vocabulary) + inspect.getsource(type(engine)._decode_one)
        size = engine.model.get_output_embeddings().weight.shape[0]
    except Exception:  # noqa: BLE001 - the fingerprint only saves work: any failure means decode
        return None
    parts = (
        transformers.__version__,
        tokenizers.__version__,
        code,
        str(size),
        repr(getattr(tokenizer, "clean_up_tokenization_spaces", None)),
        repr(getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", None)),
        state,
    )
    return hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def max_gap(batched, alone) -> float:
    """The noise floor's rule (docs/conventions.md): max |d(batched) - d(alone)| over two KLMatrix
    lists of one prompt (every probe, layer and divergence), up to the first generated token
    where their continuations differ."""
    worst = 0.0
    for one, other in zip(batched, alone):
        a, b = one.generation.token_ids, other.generation.token_ids
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        for name, values in one.values.items():
            diff = np.abs(values[:, :same].astype(np.float64) - other.values[name][:, :same])
            if np.isfinite(diff).any():
                worst = max(worst, float(np.nanmax(diff)))
    return worst


@dataclass(frozen=True)
class ShardResult:
    model: str
    key: str
    prompts: int
    failed: int
    cells: int
    seconds: float


class Worker:
    """Holds one loaded model; computes and stores shards of prompts."""

    def __init__(
        self,
        model: str,
        label: str,
        store_uri: str | Store,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        loaded=None,
        num_threads: int | None = None,
        actor: str = "local",
        node: str | None = None,
        device_map=None,
        max_memory=None,
        engine=None,
    ):
        """`loaded`: a model already in memory (not loaded again); `engine`: its Engine too
        (the Python API's, so its per-model checks are not repeated)."""
        from klstore.core.engine import Engine
        from klstore.core.models import load_model, quiet_libraries
        from klstore.store import open_store

        quiet_libraries()
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.label = check_label(label, "model label")
        self.store = open_store(store_uri, create=True)
        if loaded is None:
            loaded = load_model(
                model,
                device=device,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                device_map=device_map,
                max_memory=max_memory,
            )
        self.engine = engine if engine is not None else Engine(loaded)
        self.actor = actor  # recorded in the `shards` table: a Ray actor id, or "local"
        self.node = node or socket.gethostname()  # likewise: the host (and Ray node) it runs on
        self._prepared: set = set()  # jobs checked against this model
        self._layers: dict[str, tuple[int, ...]] = {}  # layer spec -> resolved block indices
        self._tokens_written = False  # the model's vocabulary is in the store
        self._floor_measured = False  # this worker measured a noise floor (once is enough)
        self._fingerprint: str | None = None  # the model fingerprint (`describe`)

    def describe(self) -> dict:
        """Where this worker runs and on what, as the `shards` table records it: node, actor,
        device, and the model fingerprint (docs/conventions.md, "Lenses"; hashed once)."""
        if self._fingerprint is None:
            from klstore.core.lenses import model_fingerprint

            self._fingerprint = model_fingerprint(self.engine.model)
        placed = getattr(self.engine.model, "hf_device_map", None)
        device = str(self.engine.device)
        if placed and len(set(placed.values())) > 1:  # split over devices: name them all
            device = "+".join(sorted({f"cuda:{d}" if isinstance(d, int) else str(d) for d in placed.values()}))
        return {"node": self.node, "actor": self.actor, "device": device, "fingerprint": self._fingerprint}

    def prepare(self, job: ComputeSpec) -> None:
        """Check the job's probes and layers against this model (once per job), before any work."""
        key = (tuple(p.key() for p in job.probes), job.layers, job.generation)
        if key in self._prepared:
            return
        from klstore.core.steering import prepare_probes
        from klstore.spec import parse_layers

        self._layers[job.layers] = parse_layers(job.layers, self.engine.n_layers, self.label)
        prepare_probes(self.engine, job.probes, job.generation)
        self._prepared.add(key)

    def compute(self, prompts, job: ComputeSpec):
        """PromptOutcome per prompt; a prompt that fails is recorded, the others go on.
        A bad vector or a missing sub-layer fails the whole shard (it is the model's problem)."""
        from klstore.run.records import PromptOutcome

        self.prepare(job)
        results = self.engine.compute(list(prompts), job, self._layers[job.layers])
        outcomes = []
        for prompt, result in zip(prompts, results):
            if isinstance(result, KlstoreError):
                outcomes.append(PromptOutcome(prompt, error=str(result)))
            elif isinstance(result, Exception):
                outcomes.append(PromptOutcome(prompt, error=f"{type(result).__name__}: {result}"))
            else:
                outcomes.append(PromptOutcome(prompt, tuple(result)))
        return outcomes

    def _noise_floor(self, outcomes, job: ComputeSpec) -> float | None:
        """The largest |divergence| difference between the shard's first good prompt as computed
        in its batch and computed alone with the exact clean pass (every probe, layer and
        divergence), over the generated tokens both computations share. So it measures batch
        composition and, with `clean_pass: cached` or a reduced `matmul_precision`, those too
        (the prompt alone runs exact, at full precision). None when the shard had one prompt (no
        batch, exact pass, full precision) or none ok. In fp32 on CPU it is ~1e-6 (cached: ~5e-5);
        on GPUs in bf16 batch composition moves results more."""
        exact = all(getattr(job, key) == default for key, (_, default) in SPEED_MODES.items())
        if len(outcomes) < (2 if exact else 1):
            return None
        first = next((o for o in outcomes if o.status == "ok"), None)
        if first is None:
            return None
        exact_alone = job.model_copy(
            update={"batch_size": 1, "topk": 0, **{key: default for key, (_, default) in SPEED_MODES.items()}}
        )
        alone = self.engine.compute([first.prompt], exact_alone, self._layers[job.layers])[0]
        if isinstance(alone, Exception):
            return None
        return max_gap(first.matrices, alone)

    def _write_tokens(self) -> None:
        """The model's vocabulary into the `tokens` table, once (before the shard's rows that use it).

        Decoding every id costs seconds for a large vocabulary (Gemma 3: 262k ids), and each worker
        of a label would pay it only to find the file already there. So the file carries in its
        Parquet metadata the fingerprint of what decoded it (`tokenizer_fingerprint`), and a worker
        whose fingerprint a present file carries skips the decode. Without a fingerprint, or when
        no file carries it, the worker decodes and the texts' hash names the file, as before: a
        fingerprint can only save a decode, never keep a vocabulary its texts would not."""
        if self._tokens_written:
            return
        from klstore.run import records
        from klstore.store.tables import RECORD_SUFFIX, TOKENS_SCHEMA

        present = self.store.partition_files("tokens", model=self.label)
        mark = tokenizer_fingerprint(self.engine)
        if mark is not None and any(self._tokens_mark(path) == mark for path in present):
            self._tokens_written = True
            return
        texts = self.engine.vocabulary()
        name = records.tokens_file_name(texts)
        kept = [path for path in present if path.endswith("/" + name)]
        # Same texts already there: rewrite them only to add this fingerprint (so later workers skip).
        if not kept or mark is not None:
            schema = TOKENS_SCHEMA.with_metadata({TOKENIZER_KEY: mark}) if mark else TOKENS_SCHEMA
            final = f"{self.store.table_dir('tokens', model=self.label)}/{name}"
            self.store.write_file(final, records.token_rows(texts).cast(schema), schema)
        # One vocabulary per label: another one here came from a model that had this label
        # before (or an older tokenizer); the newest wins (docs/store.md, the `tokens` table).
        for path in present:
            if path not in kept:
                self.store.delete(path)
                self.store.delete(path + RECORD_SUFFIX)
        self._tokens_written = True

    def _tokens_mark(self, path: str) -> str | None:
        """The tokenizer fingerprint a tokens file was written with; None when it has none or
        cannot be read (gone meanwhile, damaged: `verify` names it), which means: decode."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            metadata = pq.read_schema(path, filesystem=self.store.fs).metadata or {}
        except (OSError, pa.ArrowInvalid):
            return None
        value = metadata.get(TOKENIZER_KEY.encode())
        return value.decode() if value is not None else None

    def run_shard(self, run_id: str, prompts, job: ComputeSpec, parts=None, outcomes=None) -> ShardResult:
        """Compute a shard (or take its `outcomes`, computed before: `Result.save`) and write its
        files (only `parts` when given, see plan.ShardTask); the prompts file goes last (it marks
        the shard done)."""
        from klstore.run import records

        start = time.perf_counter()
        started_at = datetime.now(timezone.utc)
        if outcomes is None:
            outcomes = self.compute(prompts, job)
        else:
            self.prepare(job)
        if job.topk:
            self._write_tokens()
        key = shard_key([p.id for p in prompts])
        name = f"part-{key}.parquet"
        wanted = set(parts or shard_parts(job))
        cells = 0
        for probe in job.readouts:
            rows = records.kl_rows(outcomes, probe)
            cells += rows.num_rows
            if f"kl:{probe}" in wanted:
                self.store.write("kl", rows, name, model=self.label, probe=probe, run_id=run_id)
        if "generations" in wanted:
            self.store.write("generations", records.generation_rows(outcomes), name, model=self.label, run_id=run_id)
        if "prompts" in wanted:
            self.store.write("prompts", records.prompt_rows(outcomes), name, model=self.label, run_id=run_id)
        failed = sum(1 for o in outcomes if o.status != "ok")
        ended_at, seconds = datetime.now(timezone.utc), time.perf_counter() - start  # the shard's own work
        floor = None
        if not self._floor_measured:  # once per worker: one prompt again, alone (costs one prompt)
            floor = self._noise_floor(outcomes, job)
            self._floor_measured = floor is not None
        attempt = records.shard_attempt_row(
            key, self.describe(), started_at, ended_at, len(prompts), cells, "ok", noise_floor=floor
        )
        self.store.write("shards", attempt, records.attempt_file_name(key), model=self.label, run_id=run_id)
        return ShardResult(self.label, key, len(prompts), failed, cells, seconds)
