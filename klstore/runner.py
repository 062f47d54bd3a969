"""The distributed runner: the only module that imports ray.

One model copy per actor (a `Worker` wrapped as a Ray actor); shards of prompts
are handed out one at a time as actors become free, so a slow actor never holds
the run back; each actor writes its shards' rows straight into the store.

Faults: an actor that dies mid-shard (e.g. SIGKILL) is replaced and its shard
redone (the shard's files have deterministic names, so nothing is duplicated);
a model that cannot load fails with a message naming it and the other models
go on; a failing prompt is recorded by the worker. Resume: shards whose prompts
are all in the store's `prompts` table for this run are skipped.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field


log = logging.getLogger("klstore.runner")
MAX_SHARD_ATTEMPTS = 3


@dataclass
class ModelProgress:
    label: str
    prompts_total: int
    prompts_done: int = 0
    failed_prompts: int = 0
    cells: int = 0
    error: str | None = None
    attempts: dict = field(default_factory=dict)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _init_ray(num_cpus: int | None = None):
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return ray


def _actor_count(resources: dict, model, n_models: int) -> int:
    """Configured `actors`, else as many as the cluster holds (models share it evenly)."""
    if model.actors:
        return model.actors
    gpus = resources.get("GPU", 0)
    if gpus and model.num_gpus > 0:
        return max(1, int(gpus / model.num_gpus / n_models))
    return max(1, int(resources.get("CPU", 1) / (model.num_cpus or 1) / n_models))


def _actor_cpus(resources: dict, model, total_actors: int) -> float:
    """Configured `num_cpus`, else 1 beside a GPU, else the CPUs divided among all actors
    (Ray sets each actor's OMP_NUM_THREADS from it, so a lone actor uses every core)."""
    if model.num_cpus is not None:
        return model.num_cpus
    if resources.get("GPU", 0) and model.num_gpus > 0:
        return 1.0
    return float(max(1, int(resources.get("CPU", 1) // max(total_actors, 1))))


def run(cfg, store_uri: str | None = None, progress_every: float = 10.0,
        num_cpus: int | None = None, on_shard_done=None) -> dict:
    """Run an experiment config on Ray (RAY_ADDRESS, or a local instance). Returns a summary dict.

    `on_shard_done(label, ShardResult)` is called in the driver after each stored shard.
    If the driver itself fails, the run is marked failed; running it again resumes.
    """
    from klstore.store import open_store
    from klstore.worker import Worker, pending_shards, run_id_for, versions

    store_uri = store_uri or cfg.store
    store = open_store(store_uri, create=True)
    identity = cfg.identity()
    run_id = run_id_for(identity)
    config_record = {**identity, "store": store_uri, "source": cfg.source}
    ray = _init_ray(num_cpus)
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    store.write_run(run_id, cfg.name, "running", config_record, versions())

    from klstore.worker import Job

    job = Job(cfg.probes, cfg.layers, cfg.divergences, cfg.generation)
    remote_worker = ray.remote(Worker)
    queues, progress, pools = {}, {}, {}
    for model in cfg.models:
        shards, todo = pending_shards(store, model.label, run_id, cfg.prompts, cfg.shard_size)
        progress[model.label] = ModelProgress(model.label, len(cfg.prompts),
                                              prompts_done=sum(len(s) for s in shards) - sum(len(s) for s in todo))
        queues[model.label] = list(todo)
        _say(f"[{model.label}] {len(shards) - len(todo)} of {len(shards)} shards already in the store")

    resources = ray.cluster_resources()
    counts = {m.label: min(_actor_count(resources, m, len(cfg.models)), len(queues[m.label]))
              for m in cfg.models}
    cpus = {m.label: _actor_cpus(resources, m, sum(counts.values())) for m in cfg.models}

    def new_actor(model):
        options = {"num_cpus": cpus[model.label], "max_restarts": 0}
        if has_gpu and model.num_gpus > 0:
            options["num_gpus"] = model.num_gpus
        return remote_worker.options(**options).remote(
            model.name, model.label, store_uri, device=model.device, dtype=model.dtype,
            trust_remote_code=model.trust_remote_code, num_threads=int(cpus[model.label]))

    in_flight = {}  # ObjectRef -> (model, actor, shard)
    ready_refs = {}  # ObjectRef of actor readiness -> (model, actor)
    for model in cfg.models:
        if not queues[model.label]:
            continue
        count = counts[model.label]
        pools[model.label] = []
        for _ in range(count):
            actor = new_actor(model)
            ready_refs[actor.__ray_ready__.remote()] = (model, actor)
        _say(f"[{model.label}] starting {count} actor(s)")

    def dispatch(model, actor):
        queue = queues[model.label]
        if queue and progress[model.label].error is None:
            shard = queue.pop(0)
            ref = actor.run_shard.remote(run_id, shard, job)
            in_flight[ref] = (model, actor, shard)
            return True
        ray.kill(actor)
        return False

    try:
        return _drive(ray, cfg, store, run_id, config_record, queues, progress, in_flight, ready_refs,
                      dispatch, new_actor, progress_every, on_shard_done)
    except BaseException:
        store.write_run(run_id, cfg.name, "failed", config_record, versions())
        for _model, actor, _shard in in_flight.values():
            ray.kill(actor)
        for _model, actor in ready_refs.values():
            ray.kill(actor)
        raise


def _drive(ray, cfg, store, run_id, config_record, queues, progress, in_flight, ready_refs,
           dispatch, new_actor, progress_every, on_shard_done) -> dict:
    from klstore.worker import versions

    store_uri = store.uri
    start = last_report = time.time()
    first_ready = None
    while in_flight or ready_refs:
        refs = list(in_flight) + list(ready_refs)
        finished, _ = ray.wait(refs, num_returns=1, timeout=progress_every)
        for ref in finished:
            if ref in ready_refs:
                model, actor = ready_refs.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    _model_failed(progress[model.label], model, exc, queues)
                    continue
                first_ready = first_ready or time.time()
                dispatch(model, actor)
                continue
            model, actor, shard = in_flight.pop(ref)
            state = progress[model.label]
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                key = tuple(p.id for p in shard)
                state.attempts[key] = state.attempts.get(key, 0) + 1
                if state.attempts[key] >= MAX_SHARD_ATTEMPTS:
                    state.error = f"shard of {len(shard)} prompts failed {MAX_SHARD_ATTEMPTS} times: {_first_line(exc)}"
                    _say(f"[{model.label}] giving up: {state.error}")
                    continue
                _say(f"[{model.label}] actor died ({_first_line(exc)}); replacing it and redoing its shard")
                queues[model.label].insert(0, shard)
                replacement = new_actor(model)
                ready_refs[replacement.__ray_ready__.remote()] = (model, replacement)
                continue
            except ray.exceptions.RayTaskError as exc:
                state.error = f"shard failed: {_first_line(exc)}"
                _say(f"[{model.label}] {state.error}")
                continue
            state.prompts_done += result.prompts
            state.failed_prompts += result.failed
            state.cells += result.cells
            if on_shard_done is not None:
                on_shard_done(model.label, result)
            dispatch(model, actor)
        if time.time() - last_report >= progress_every or not (in_flight or ready_refs):
            last_report = time.time()
            _report(progress, start)

    failed_models = {label: p.error for label, p in progress.items() if p.error}
    status = "failed" if failed_models else "completed"
    store.write_run(run_id, cfg.name, status, config_record, versions())
    total = sum(p.prompts_done for p in progress.values())
    cells = sum(p.cells for p in progress.values())
    elapsed = time.time() - start
    _say(f"run {run_id} {status}: {total} prompt x model results, "
         f"{sum(p.failed_prompts for p in progress.values())} failed prompts, {cells} cells "
         f"in {elapsed:.1f} s" + "".join(f"; model {k} failed: {v}" for k, v in failed_models.items()))
    return {"run_id": run_id, "status": status, "failed_models": failed_models, "store": store_uri,
            "progress": progress, "seconds": elapsed,
            "seconds_after_first_actor_ready": time.time() - (first_ready or start)}


def _first_line(exc) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if "KlstoreError" in line or "Error:" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _model_failed(state: ModelProgress, model, exc, queues) -> None:
    state.error = f"cannot load model {model.name!r}: {_first_line(exc)}"
    queues[model.label].clear()
    _say(f"[{model.label}] {state.error}")


def _report(progress: dict, start: float) -> None:
    elapsed = max(time.time() - start, 1e-9)
    done = sum(p.prompts_done for p in progress.values())
    total = sum(p.prompts_total for p in progress.values() if p.error is None) + \
        sum(p.prompts_done for p in progress.values() if p.error is not None)
    cells = sum(p.cells for p in progress.values())
    rate = cells / elapsed
    remaining = total - done
    per_prompt = elapsed / done if done else None
    eta = f"{remaining * per_prompt:.0f} s" if per_prompt and remaining else "-"
    _say(f"progress: {done}/{total} prompts, {rate:.0f} cells/s, elapsed {elapsed:.0f} s, ETA {eta}")
