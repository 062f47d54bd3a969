"""The run lifecycle, shared by both executors (`klstore compute --store` in-process and the Ray runner).

A run is identified by its config: `run_id = <name>-<sha256 of the canonical identity>[:10]`,
so the same work maps to the same id and its files. Its prompts are cut into fixed
shards of `shard_size` (a shard's file key is a hash of its prompt ids). A shard is done
when every table holds it: each probe's `kl` partition, `generations` and `prompts`
(file names and file records, read directly, no views). A shard missing from some of
them (a file quarantined by `verify`) is recomputed and only its missing parts written.
The `runs` row goes running -> completed | failed, and a failure of the driver itself
marks the run failed before the error goes on; running it again resumes.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

from klstore.spec import ExperimentConfig, GenerationSpec, ProbeSpec, Prompt, check_label
from klstore.store.tables import Store, open_store, work_key


@dataclass(frozen=True)
class ShardTask:
    """A shard to compute, and which of its parts to write: "kl:<probe>", "generations", "prompts"."""

    prompts: tuple[Prompt, ...]
    parts: tuple[str, ...]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(p.id for p in self.prompts)


def shard_parts(probes) -> tuple[str, ...]:
    """Everything a shard writes, in order: the prompts part last (it marks the shard done)."""
    return (*(f"kl:{p.name}" for p in probes), "generations", "prompts")


@dataclass(frozen=True)
class Job:
    """What to compute for every prompt, independent of the model."""

    probes: tuple[ProbeSpec, ...]
    layers: str = "all"
    divergences: tuple[str, ...] = ("kl",)
    generation: GenerationSpec = GenerationSpec()


def run_id_for(identity: dict) -> str:
    """The run name plus a hash of the canonical config, so the same work maps to the same id."""
    name = check_label(identity.get("name", "run"), "run name")
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{name}-{digest}"


def shard_key(prompt_ids) -> str:
    """The file key of a shard: a hash of its prompt ids, so a redone shard replaces its files."""
    return work_key(*prompt_ids)


def versions() -> dict[str, str]:
    """Library versions recorded in the run's row."""
    import torch
    import transformers

    import klstore

    return {"klstore": klstore.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


def done_prompt_ids(store: Store, model_label: str, run_id: str) -> set[str]:
    """Prompt ids of (model, run) already in the store: its `prompts` partition, read directly."""
    import pyarrow.parquet as pq

    import pyarrow as pa

    from klstore.errors import KlstoreError, first_line

    done: set[str] = set()
    for path in store.partition_files("prompts", model=model_label, run_id=run_id):
        try:
            table = pq.read_table(path, columns=["prompt_id"], filesystem=store.fs, partitioning=None)
        except (OSError, pa.ArrowInvalid) as exc:
            raise KlstoreError(f"cannot read {path} ({first_line(exc)}); run `klstore verify --quarantine`") from None
        done.update(table.column("prompt_id").to_pylist())
    return done


class RunPlan:
    """One experiment run in one store: its id, its shards per model, and its `runs` row."""

    def __init__(self, config: ExperimentConfig, store_uri: str | None = None):
        self.config = config
        self.store_uri = store_uri or config.store
        self.store = open_store(self.store_uri, create=True)  # unwritable: fails before any work
        from klstore.store.integrity import recover

        recover(self.store)  # an interrupted compaction is finished or undone before any write
        identity = config.identity()
        self.run_id = run_id_for(identity)
        self.record = {**identity, "store": self.store_uri, "source": config.source}
        self.job = Job(config.probes, config.layers, config.divergences, config.generation)
        self.shards: list[tuple[Prompt, ...]] = [
            tuple(config.prompts[i:i + config.shard_size])
            for i in range(0, len(config.prompts), config.shard_size)]

    def pending(self, model_label: str) -> list[ShardTask]:
        """The shards of this model not wholly in the store, with their missing parts
        (slicing before filtering keeps shard keys stable)."""
        from klstore.store.integrity import shards_present

        parts = shard_parts(self.config.probes)
        present = {}
        for part in parts:
            table, _, probe = part.partition(":")
            where = {"model": model_label, "run_id": self.run_id, **({"probe": probe} if probe else {})}
            present[part] = shards_present(self.store, table, **where)
        legacy_done = None
        tasks = []
        for shard in self.shards:
            key = shard_key([p.id for p in shard])
            missing = []
            for part in parts:
                if present[part] is None:  # a compacted file without a record: trust the prompts table
                    if legacy_done is None:
                        legacy_done = done_prompt_ids(self.store, model_label, self.run_id)
                    if not {p.id for p in shard} <= legacy_done:
                        missing.append(part)
                elif key not in present[part]:
                    missing.append(part)
            if missing:
                tasks.append(ShardTask(shard, tuple(missing)))
        return tasks

    def mark(self, status: str) -> None:
        """Write the run's row with `status` (running, completed or failed)."""
        self.store.write_run(self.run_id, self.config.name, status, self.record, versions())

    @contextmanager
    def running(self):
        """Mark the run running; if the body raises (or is interrupted), mark it failed."""
        self.mark("running")
        try:
            yield self
        except BaseException:
            try:
                self.mark("failed")
            except OSError:  # the store itself cannot be written (full, read-only): the error says so
                pass
            raise


def execute_local(plan: RunPlan, worker, say=lambda m: print(m, file=sys.stderr)) -> dict:
    """Run every pending shard of one model in this process (`klstore compute --store`)."""
    label = worker.label
    prompts = len(plan.config.prompts)
    todo = plan.pending(label)
    say(f"run {plan.run_id}: {prompts} prompts in {len(plan.shards)} shards, "
        f"{len(plan.shards) - len(todo)} already done")
    finished = prompts - sum(len(task.prompts) for task in todo)
    failed = cells = 0
    start = time.time()
    with plan.running():
        for task in todo:
            result = worker.run_shard(plan.run_id, task.prompts, plan.job, task.parts)
            finished, failed, cells = finished + result.prompts, failed + result.failed, cells + result.cells
            say(f"[{label}] {finished}/{prompts} prompts, {cells / max(time.time() - start, 1e-9):.0f} cells/s")
        plan.mark("completed")
    return {"run_id": plan.run_id, "status": "completed", "prompts": prompts, "failed": failed,
            "cells": cells, "store": plan.store_uri}
