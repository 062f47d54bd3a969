"""The run lifecycle, shared by both executors (`klstore compute --store` in-process and the Ray runner).

A run is identified by its config: `run_id = <name>-<sha256 of the canonical identity>[:10]`,
so the same work maps to the same id and its files. Its prompts are cut into fixed
shards of `shard_size` (a shard's file key is a hash of its prompt ids). A shard is done
when every table holds it: each probe's `kl` partition, `generations` and `prompts`
(file names and file records, read directly, no views). A shard missing from some of
them (a file quarantined by `verify`) is recomputed and only its missing parts written.
The `runs` row goes running -> completed | failed, and a failure of the driver itself
marks the run failed before the error goes on; running it again resumes.

Also here, without Ray (the runner alone imports it): how many actors of a model a
cluster can place (`actor_count`, from each node's resources), the checks of a config
against a cluster (`check_cluster`), and the dry run's numbers (`RunPlan.estimate`).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

from klstore.errors import KlstoreError
from klstore.spec import ComputeSpec, ExperimentConfig, Prompt, check_label
from klstore.store.tables import Store, open_store, work_key

# Bytes on disk per `kl` row measured on 100 M rows (docs/performance.md, "Store": benchmarks/store.py);
# the dry run uses it when the store holds no `kl` rows to measure.
MEASURED_BYTES_PER_KL_ROW = 3.5  # benchmarks/store.py, without lens tokens
MEASURED_BYTES_PER_LENS_TOKEN = 5.2  # benchmarks/store.py: per (cell, rank) at k = 5, SmolLM2


@dataclass(frozen=True)
class ShardTask:
    """A shard to compute, and which of its parts to write: "kl:<probe>", "generations", "prompts"."""

    prompts: tuple[Prompt, ...]
    parts: tuple[str, ...]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(p.id for p in self.prompts)


def shard_parts(compute: ComputeSpec) -> tuple[str, ...]:
    """Everything a shard writes, in order: the kl rows of each probe name (the read-out's once per
    lens, `ComputeSpec.readouts`), then generations, and the prompts part last (it marks the shard done)."""
    return (*(f"kl:{name}" for name in compute.readouts), "generations", "prompts")


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

    return {"klstore": klstore.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def done_prompt_ids(store: Store, model_label: str, run_id: str) -> set[str]:
    """Prompt ids of (model, run) already in the store: its `prompts` partition, read directly."""
    done: set[str] = set()
    for path in store.partition_files("prompts", model=model_label, run_id=run_id):
        done.update(_read_column(store, path, "prompt_id"))
    return done


def _read_column(store: Store, path: str, column: str) -> list:
    """One column of one of the store's Parquet files ([] when the file predates the column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from klstore.errors import first_line

    try:
        table = pq.read_table(path, columns=[column], filesystem=store.fs, partitioning=None)
    except (OSError, pa.ArrowInvalid) as exc:
        if "No match for FieldRef" in str(exc):  # a file written before the column existed
            return []
        raise KlstoreError(f"cannot read {path} ({first_line(exc)}); run `klstore verify --quarantine`") from None
    return table.column(column).to_pylist()


# ------------------------------------------------------------ the cluster
# A cluster is described by its alive nodes' resources: a list of dicts such as
# {"CPU": 16.0, "GPU": 4.0} (the runner reads them from `ray.nodes()`).


def _fits_on(node: dict, gpus: float, cpus: float) -> int:
    """How many actors needing `gpus` and `cpus` one node holds at once. A fraction of a GPU
    is packed within one GPU (two 0.5-GPU actors per GPU, one 0.75-GPU actor per GPU);
    several GPUs must be whole GPUs of one node (Ray's rules)."""
    by_cpu = int(node.get("CPU", 0) / cpus + 1e-9)
    if gpus <= 0:
        return by_cpu
    whole = int(node.get("GPU", 0) + 1e-9)
    by_gpu = whole * int(1 / gpus + 1e-9) if gpus < 1 else int(whole / gpus + 1e-9)
    return min(by_cpu, by_gpu)


def uses_gpus(nodes: list[dict], model) -> bool:
    """Whether the model's actors ask for GPUs: `num_gpus` is ignored on a cluster without any."""
    return model.num_gpus > 0 and any(node.get("GPU", 0) > 0 for node in nodes)


def actor_count(nodes: list[dict], model, n_models: int) -> int:
    """Configured `actors`, else as many as the nodes hold at once (models share them evenly):
    per node the fewer of its GPUs (`num_gpus` per actor) and its CPUs (`num_cpus`, default 1)."""
    if model.actors:
        return model.actors
    gpus = model.num_gpus if uses_gpus(nodes, model) else 0.0
    fit = sum(_fits_on(node, gpus, model.num_cpus or 1.0) for node in nodes)
    return max(1, int(fit / n_models))


def actor_cpus(nodes: list[dict], model, total_actors: int) -> float:
    """Configured `num_cpus`, else 1 beside a GPU, else the CPUs divided among all actors (at most
    one node's; Ray sets each actor's OMP_NUM_THREADS from it, so a lone actor uses every core)."""
    if model.num_cpus is not None:
        return model.num_cpus
    if uses_gpus(nodes, model):
        return 1.0
    total = sum(node.get("CPU", 0) for node in nodes)
    largest = max((node.get("CPU", 0) for node in nodes), default=1)
    return float(max(1, int(min(total // max(total_actors, 1), largest))))


def check_cluster(config: ExperimentConfig, store_uri: str, nodes: list[dict]) -> None:
    """Config errors only a cluster shows, before any actor starts: an actor larger than every
    node (it would wait forever), and a local-folder store on a cluster of several nodes."""
    most_gpus = max((node.get("GPU", 0) for node in nodes), default=0)
    most_cpus = max((node.get("CPU", 0) for node in nodes), default=0)
    for model in config.models:
        if most_gpus and model.num_gpus > most_gpus:
            raise KlstoreError(
                f"model {model.label!r}: num_gpus {model.num_gpus:g} per actor, but no node of the "
                f"cluster has more than {most_gpus:g} GPUs, so no actor could start"
            )
        if model.num_cpus and model.num_cpus > most_cpus:
            raise KlstoreError(
                f"model {model.label!r}: num_cpus {model.num_cpus:g} per actor, but no node of the "
                f"cluster has more than {most_cpus:g} CPUs, so no actor could start"
            )
    if len(nodes) > 1 and not store_uri.startswith("s3://") and not config.shared_store:
        raise KlstoreError(
            f"store {store_uri} is a local folder, but the cluster has {len(nodes)} nodes and every "
            "node must write to the same place: use an s3:// store, or set `shared_store: true` "
            "(klstore run --shared-store) if every node mounts this folder (NFS and the like)"
        )


# ------------------------------------------------------------ the dry run
@dataclass(frozen=True)
class ModelEstimate:
    """One model's share of a run, before any work. `cells` (= expected `kl` rows) is an upper
    bound: generation may stop at an end-of-sequence token, leaving fewer columns."""

    label: str
    prompts: int
    shards: int
    shards_done: int  # shards wholly in the store (skipped by a resume)
    layers: int | None  # None: the model's depth is unknown without loading it (a hub id)
    cells: int | None  # prompts x layers x max_new_tokens x probes
    kl_rows_in_store: int  # `kl` rows of this run and model already in the store
    actors: int  # how many the cluster holds at once
    actors_started: int  # what the runner would start: at most one per shard to do

    @property
    def kl_rows(self) -> int | None:
        return self.cells


@dataclass(frozen=True)
class Estimate:
    run_id: str
    store: str
    models: tuple[ModelEstimate, ...]
    nodes: int
    cpus: float
    gpus: float
    cluster: str  # where the resources were read
    bytes_per_kl_row: float
    bytes_measured_on: int  # kl rows of the store they were measured on; 0: the README's measurement

    @property
    def kl_rows(self) -> int | None:
        rows = [m.kl_rows for m in self.models]
        known = [r for r in rows if r is not None]
        return sum(known) if len(known) == len(rows) else None

    @property
    def kl_bytes(self) -> float | None:
        """Expected size of the run's `kl` files (the other tables are a small fraction)."""
        return None if self.kl_rows is None else self.kl_rows * self.bytes_per_kl_row


def _existing_store(uri: str) -> Store | None:
    """The store for reading, or None when a local folder does not exist yet (nothing is created)."""
    import os

    if not uri.startswith("s3://") and not os.path.isdir(os.path.abspath(os.path.expanduser(uri))):
        return None
    return open_store(uri, create=True) if uri.startswith("s3://") else open_store(uri)


class RunPlan:
    """One experiment run in one store: its id, its shards per model, and its `runs` row.

    `write=False` (the dry run) neither creates the store nor finishes an interrupted
    compaction; a store that does not exist yet reads as empty."""

    def __init__(self, config: ExperimentConfig, store_uri: str | None = None, write: bool = True):
        self.config = config
        self.store_uri = store_uri or config.store
        self.store: Store | None  # None: a dry run's store that does not exist yet
        if write:
            self.store = open_store(self.store_uri, create=True)  # unwritable: fails before any work
            from klstore.store.integrity import recover

            recover(self.store)  # an interrupted compaction is finished or undone before any write
        else:
            self.store = _existing_store(self.store_uri)
        if not all(lens.resolved for lens in config.compute.lens):  # named by path or store id
            from klstore.run import lenses  # (torch: only when a fitted lens is asked for)

            config = self.config = config.model_copy(update={"compute": lenses.resolve(config.compute, self.store)})
        identity = config.identity()
        self.run_id = run_id_for(identity)
        self.record = {**identity, "store": self.store_uri, "source": config.source}
        self.job = config.compute  # what every shard computes (spec.ComputeSpec)
        self.shards: list[tuple[Prompt, ...]] = [
            tuple(config.prompts[i : i + config.shard_size]) for i in range(0, len(config.prompts), config.shard_size)
        ]

    def pending(self, model_label: str) -> list[ShardTask]:
        """The shards of this model not wholly in the store, with their missing parts
        (slicing before filtering keeps shard keys stable)."""
        from klstore.store.integrity import shards_present

        if self.store is None:  # a dry run before the store exists
            return [ShardTask(shard, shard_parts(self.config.compute)) for shard in self.shards]
        parts = shard_parts(self.config.compute)
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
                recorded = present[part]
                if recorded is None:  # a compacted file without a record: trust the prompts table
                    if legacy_done is None:
                        legacy_done = done_prompt_ids(self.store, model_label, self.run_id)
                    if not {p.id for p in shard} <= legacy_done:
                        missing.append(part)
                elif key not in recorded:
                    missing.append(part)
            if missing:
                tasks.append(ShardTask(shard, tuple(missing)))
        return tasks

    def estimate(self, nodes: list[dict], cluster: str = "") -> Estimate:
        """The work of this run without doing it: per model prompts, shards, cells and `kl` rows
        (layers from the model's config; no weights are read), what the store already holds of
        this run, the actors `nodes` can place, and the expected size of the `kl` files."""
        from klstore.core.models import read_shape
        from klstore.spec import parse_layers
        from klstore.store.integrity import visible
        from klstore.store.views import sql

        cfg = self.config
        in_store: dict[str, int] = {}
        measured_rows, measured_bytes = 0, 0
        if self.store is not None:
            _, rows = sql(self.store, "SELECT model, count(*) FROM kl WHERE run_id = ? GROUP BY model", [self.run_id])
            in_store = dict(rows)
            measured_rows = sql(self.store, "SELECT count(*) FROM kl")[1][0][0]
            measured_bytes = sum(self.store.fs.get_file_info(path).size for path in visible(self.store, "kl"))
        per_prompt = cfg.generation.max_new_tokens * len(cfg.compute.readouts)
        models = []
        for model in cfg.models:
            shape = read_shape(model.name, model.trust_remote_code)
            layers = None if shape is None else len(parse_layers(cfg.layers, shape.n_layers, model.label))
            todo = self.pending(model.label)
            actors = actor_count(nodes, model, len(cfg.models))
            models.append(
                ModelEstimate(
                    label=model.label,
                    prompts=len(cfg.prompts),
                    shards=len(self.shards),
                    shards_done=len(self.shards) - len(todo),
                    layers=layers,
                    cells=None if layers is None else len(cfg.prompts) * layers * per_prompt,
                    kl_rows_in_store=int(in_store.get(model.label, 0)),
                    actors=actors,
                    actors_started=min(actors, len(todo)),
                )
            )
        per_row = (
            measured_bytes / measured_rows
            if measured_rows
            else MEASURED_BYTES_PER_KL_ROW + cfg.compute.topk * MEASURED_BYTES_PER_LENS_TOKEN
        )
        return Estimate(
            run_id=self.run_id,
            store=self.store_uri,
            models=tuple(models),
            nodes=len(nodes),
            cpus=sum(node.get("CPU", 0) for node in nodes),
            gpus=sum(node.get("GPU", 0) for node in nodes),
            cluster=cluster,
            bytes_per_kl_row=per_row,
            bytes_measured_on=int(measured_rows),
        )

    @property
    def target(self) -> Store:
        """The store the run writes to: a plan made to write (write=True) always has one."""
        assert self.store is not None, "a dry-run plan (write=False) writes nothing"
        return self.store

    def mark(self, status: str) -> None:
        """Write the run's row with `status` (running, completed or failed); a completed run's
        noise floor is the largest its shard attempts measured (docs/conventions.md)."""
        floor = self.noise_floor() if status == "completed" else None
        self.target.write_run(self.run_id, self.config.name, status, self.record, versions(), floor)

    def noise_floor(self) -> float | None:
        """max(noise_floor) over this run's shard attempts (None when none measured one), read
        from the run's own `shards` files: views over the whole store would read every kl
        file's footer for one number."""
        from klstore.store.integrity import visible

        mine = f"/run_id={self.run_id}/"
        floors = [
            value
            for path in visible(self.target, "shards")
            if mine in path
            for value in _read_column(self.target, path, "noise_floor")
            if value is not None
        ]
        return float(max(floors)) if floors else None

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


def execute_local(plan: RunPlan, worker, say=lambda m: print(m, file=sys.stderr), computed: dict | None = None) -> dict:
    """Run every pending shard of one model in this process (`klstore compute --store`).
    `computed` (prompt id -> PromptOutcome, from `Result.save`): the worker writes these
    outcomes instead of computing them."""
    label = worker.label
    prompts = len(plan.config.prompts)
    todo = plan.pending(label)
    say(
        f"run {plan.run_id}: {prompts} prompts in {len(plan.shards)} shards, "
        f"{len(plan.shards) - len(todo)} already done"
    )
    finished = prompts - sum(len(task.prompts) for task in todo)
    failed = cells = 0
    start = time.time()
    with plan.running():
        for task in todo:
            outcomes = None if computed is None else [computed[p.id] for p in task.prompts]
            result = worker.run_shard(plan.run_id, task.prompts, plan.job, task.parts, outcomes=outcomes)
            finished, failed, cells = finished + result.prompts, failed + result.failed, cells + result.cells
            say(f"[{label}] {finished}/{prompts} prompts, {cells / max(time.time() - start, 1e-9):.0f} cells/s")
        plan.mark("completed")
    return {
        "run_id": plan.run_id,
        "status": "completed",
        "prompts": prompts,
        "failed": failed,
        "cells": cells,
        "store": plan.store_uri,
    }
