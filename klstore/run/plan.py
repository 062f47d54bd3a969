"""The run lifecycle, shared by both executors (`klstore compute --store` in-process and the Ray runner).

A run is identified by its config: `run_id = <name>-<sha256 of the canonical identity>[:10]`,
so the same work maps to the same id and its files. Its prompts are cut into fixed
shards of `shard_size` (a shard's file key is a hash of its prompt ids); a shard is done
when its prompts are in the run's `prompts` partition, which is read directly (no views).
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

    done: set[str] = set()
    for path in store.partition_files("prompts", model=model_label, run_id=run_id):
        done.update(pq.read_table(path, columns=["prompt_id"], filesystem=store.fs,
                                  partitioning=None).column("prompt_id").to_pylist())
    return done


class RunPlan:
    """One experiment run in one store: its id, its shards per model, and its `runs` row."""

    def __init__(self, config: ExperimentConfig, store_uri: str | None = None):
        self.config = config
        self.store_uri = store_uri or config.store
        self.store = open_store(self.store_uri, create=True)  # unwritable: fails before any work
        identity = config.identity()
        self.run_id = run_id_for(identity)
        self.record = {**identity, "store": self.store_uri, "source": config.source}
        self.job = Job(config.probes, config.layers, config.divergences, config.generation)
        self.shards: list[tuple[Prompt, ...]] = [
            tuple(config.prompts[i:i + config.shard_size])
            for i in range(0, len(config.prompts), config.shard_size)]

    def pending(self, model_label: str) -> list[tuple[Prompt, ...]]:
        """The shards of this model not yet in the store (slicing first keeps shard keys stable)."""
        done = done_prompt_ids(self.store, model_label, self.run_id)
        return [s for s in self.shards if not {p.id for p in s} <= done]

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
            self.mark("failed")
            raise


def execute_local(plan: RunPlan, worker, say=lambda m: print(m, file=sys.stderr)) -> dict:
    """Run every pending shard of one model in this process (`klstore compute --store`)."""
    label = worker.label
    prompts = len(plan.config.prompts)
    todo = plan.pending(label)
    say(f"run {plan.run_id}: {prompts} prompts in {len(plan.shards)} shards, "
        f"{len(plan.shards) - len(todo)} already done")
    finished = prompts - sum(len(s) for s in todo)
    failed = cells = 0
    start = time.time()
    with plan.running():
        for shard in todo:
            result = worker.run_shard(plan.run_id, shard, plan.job)
            finished, failed, cells = finished + result.prompts, failed + result.failed, cells + result.cells
            say(f"[{label}] {finished}/{prompts} prompts, {cells / max(time.time() - start, 1e-9):.0f} cells/s")
        plan.mark("completed")
    return {"run_id": plan.run_id, "status": "completed", "prompts": prompts, "failed": failed,
            "cells": cells, "store": plan.store_uri}
