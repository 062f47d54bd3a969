"""The worker: one model copy that computes shards of prompts and writes them to the store.

A plain class with no Ray import: `klstore compute --store` uses it in-process,
and the runner wraps it in a Ray actor. `__init__` loads the model; `run_shard`
computes a shard and writes its rows straight into the store.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from klstore.errors import KlstoreError


@dataclass(frozen=True)
class Job:
    """What to compute for every prompt, independent of the model."""

    probes: tuple  # ProbeSpec
    layers: str = "all"
    divergences: tuple[str, ...] = ("kl",)
    generation: object = None  # GenerationSpec



@dataclass(frozen=True)
class ShardResult:
    model: str
    key: str
    prompts: int
    failed: int
    cells: int
    seconds: float


def run_id_for(config: dict) -> str:
    """The run id: the run name plus a hash of the canonical config, so the same work maps to the same id."""
    from klstore.store import check_label

    name = check_label(config.get("name", "run"), "run name")
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    return f"{name}-{digest}"


def shard_key(prompt_ids) -> str:
    from klstore.store import work_key

    return work_key(*prompt_ids)


def versions() -> dict[str, str]:
    import torch
    import transformers

    import klstore

    return {"klstore": klstore.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


class Worker:
    """Holds one loaded model; computes and stores shards of prompts."""

    def __init__(self, model: str, label: str, store_uri: str, device: str = "auto",
                 dtype: str = "auto", trust_remote_code: bool = False, loaded=None,
                 num_threads: int | None = None):
        from klstore.engine import Engine
        from klstore.models import load, quiet_libraries
        from klstore.store import check_label, open_store

        quiet_libraries()
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.label = check_label(label, "model label")
        self.store = open_store(store_uri, create=True)
        if loaded is None:
            loaded = load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        self.engine = Engine(loaded)

    def compute(self, prompts, job: Job):
        """PromptOutcome per prompt; a prompt that fails is recorded, the others go on.
        A bad vector or a missing sub-layer fails the whole shard (it is the model's problem)."""
        from klstore.records import PromptOutcome

        results = self.engine.run_many(list(prompts), list(job.probes), job.layers, job.divergences,
                                       job.generation)
        outcomes = []
        for prompt, result in zip(prompts, results):
            if isinstance(result, KlstoreError):
                outcomes.append(PromptOutcome(prompt, error=str(result)))
            elif isinstance(result, Exception):
                outcomes.append(PromptOutcome(prompt, error=f"{type(result).__name__}: {result}"))
            else:
                outcomes.append(PromptOutcome(prompt, tuple(result)))
        return outcomes

    def run_shard(self, run_id: str, prompts, job: Job) -> ShardResult:
        """Compute a shard and write its files; the prompts file goes last (it marks the shard done)."""
        from klstore import records

        start = time.perf_counter()
        outcomes = self.compute(prompts, job)
        key = shard_key([p.id for p in prompts])
        name = f"part-{key}.parquet"
        cells = 0
        for probe in job.probes:
            rows = records.kl_rows(outcomes, probe.name)
            cells += rows.num_rows
            self.store.write("kl", rows, name, model=self.label, probe=probe.name, run_id=run_id)
        self.store.write("generations", records.generation_rows(outcomes), name,
                         model=self.label, run_id=run_id)
        self.store.write("prompts", records.prompt_rows(outcomes), name,
                         model=self.label, run_id=run_id)
        failed = sum(1 for o in outcomes if o.status != "ok")
        return ShardResult(self.label, key, len(prompts), failed, cells, time.perf_counter() - start)


def pending_shards(store, model_label: str, run_id: str, prompts, shard_size: int):
    """(all shards, shards still to do): fixed slices of `shard_size` prompts, minus those whose
    prompts are all in the store already. Slicing before filtering keeps shard keys stable."""
    shards = [tuple(prompts[i:i + shard_size]) for i in range(0, len(prompts), shard_size)]
    done = done_prompt_ids(store, model_label, run_id)
    return shards, [s for s in shards if not {p.id for p in s} <= done]


def done_prompt_ids(store, model_label: str, run_id: str) -> set[str]:
    """Prompt ids of (model, run) already in the store's `prompts` table."""
    from klstore import query

    if not store.files("prompts"):
        return set()
    _, rows = query.sql(store, "SELECT prompt_id FROM prompts WHERE model = "
                        f"'{model_label}' AND run_id = '{run_id}'")
    return {row[0] for row in rows}
