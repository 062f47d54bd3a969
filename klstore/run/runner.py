"""The Ray executor: the only module that imports ray.

One model copy per actor (a `Worker` wrapped as a Ray actor); shards of prompts are
handed out one at a time as actors become free, so a slow actor never holds the run
back; each actor writes its shards' rows straight into the store. The run's identity,
shards, resume and `runs` row come from klstore.run.plan, as for `compute --store`.

Faults: an actor that dies mid-shard (e.g. SIGKILL) is replaced and its shard redone
(the shard's files have deterministic names, so nothing is duplicated), at most
MAX_SHARD_ATTEMPTS times; a model that cannot load fails with a message naming it and
the other models go on; a failing prompt is recorded by the worker.

Why not Ray's own tools: `ActorPool` has no notion of a per-model failure or of
replacing a dead actor; actor restarts (`max_restarts`) would re-run `__init__` but
lose the in-flight shard, and task retries (`max_task_retries`) cannot bound attempts
per shard across replacement actors or give up on one model while others go on. So
the scheduler below keeps that state itself, in a few named fields.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from klstore.errors import KlstoreError, first_line, remote_message
from klstore.run.plan import RunPlan

MAX_SHARD_ATTEMPTS = 3  # per shard, counting attempts whose actor died
MAX_LOAD_ATTEMPTS = 3  # per model, counting actors that died while loading it
CONNECT_TIMEOUT_S = 10.0


@dataclass
class ModelProgress:
    label: str
    prompts_total: int
    prompts_done: int = 0
    failed_prompts: int = 0
    cells: int = 0
    error: str | None = None
    attempts: dict = field(default_factory=dict)  # shard prompt ids -> attempts that lost their actor
    resumed: int = 0  # prompts already in the store when the run started
    lost_loads: int = 0  # actors of this model that died while loading it
    ready: bool = False  # one actor has loaded the model


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_reachable(address: str) -> None:
    """An unreachable RAY_ADDRESS fails in seconds with one line, instead of Ray's long retries."""
    import socket

    target = address.split("://", 1)[-1].rstrip("/")
    if address == "auto" or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as exc:
        raise KlstoreError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None


def _init_ray(num_cpus: int | None = None):
    """Join the cluster named by RAY_ADDRESS, or start a local Ray. Returns the ray module and
    whether this call started it (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return ray, False
    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            _check_reachable(address)
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    except KlstoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to join is one line for the user
        message = first_line(exc)
        if any(word in str(exc).lower() for word in ("unauthenticated", "auth", "token")) \
                and os.environ.get("RAY_AUTH_MODE") != "token":
            message += (" - the cluster uses token authentication: set RAY_AUTH_MODE=token and put its "
                        "token in ~/.ray/auth_token (or RAY_AUTH_TOKEN)")
        raise KlstoreError(f"cannot start or join Ray ({address or 'local'}): {message}") from None
    return ray, True


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


def _raised_in_init(exc) -> bool:
    """Whether an actor died of an exception in Worker.__init__ (the model cannot load),
    rather than being lost (killed, its node gone)."""
    return bool(getattr(exc, "actor_init_failed", False))


class Scheduler:
    """Hands shards to actors per model; replaces dead actors; tracks progress.

    State: `queues` (shards still to hand out, per model), `in_flight` (shard task ->
    model, actor, ShardTask), `starting` (actor readiness -> model, actor), `progress`.
    """

    def __init__(self, ray, plan: RunPlan, on_shard_done=None):
        from klstore.run.worker import Worker

        self.ray, self.plan, self.on_shard_done = ray, plan, on_shard_done
        cfg = plan.config
        self.queues: dict[str, list] = {}
        self.progress: dict[str, ModelProgress] = {}
        for model in cfg.models:
            todo = plan.pending(model.label)
            self.queues[model.label] = list(todo)
            resumed = len(cfg.prompts) - sum(len(task.prompts) for task in todo)
            self.progress[model.label] = ModelProgress(model.label, len(cfg.prompts), prompts_done=resumed,
                                                       resumed=resumed)
            _say(f"[{model.label}] {len(plan.shards) - len(todo)} of {len(plan.shards)} shards already in the store")
        resources = ray.cluster_resources()
        self.has_gpu = resources.get("GPU", 0) > 0
        counts = {m.label: min(_actor_count(resources, m, len(cfg.models)), len(self.queues[m.label]))
                  for m in cfg.models}
        self.cpus = {m.label: _actor_cpus(resources, m, sum(counts.values())) for m in cfg.models}
        self.remote_worker = ray.remote(Worker)
        self.in_flight: dict = {}
        self.starting: dict = {}
        self.first_ready: float | None = None  # when the first actor had its model loaded
        for model in cfg.models:
            if counts[model.label]:
                for _ in range(counts[model.label]):
                    self._start_actor(model)
                _say(f"[{model.label}] loading model {model.name} on {counts[model.label]} actor(s)")

    def _start_actor(self, model) -> None:
        options = {"num_cpus": self.cpus[model.label], "max_restarts": 0}
        if self.has_gpu and model.num_gpus > 0:
            options["num_gpus"] = model.num_gpus
        actor = self.remote_worker.options(**options).remote(
            model.name, model.label, self.plan.store_uri, device=model.device, dtype=model.dtype,
            trust_remote_code=model.trust_remote_code, num_threads=int(self.cpus[model.label]))
        self.starting[actor.__ray_ready__.remote()] = (model, actor)

    def _dispatch(self, model, actor) -> None:
        """Give the actor its model's next shard, or let it go when there is none."""
        queue = self.queues[model.label]
        if queue and self.progress[model.label].error is None:
            task = queue.pop(0)
            ref = actor.run_shard.remote(self.plan.run_id, task.prompts, self.plan.job, task.parts)
            self.in_flight[ref] = (model, actor, task)
        else:
            self.ray.kill(actor)

    def _ready(self, ref) -> None:
        model, actor = self.starting.pop(ref)
        state = self.progress[model.label]
        try:
            self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            if _raised_in_init(exc):  # the model itself cannot load: the same on every actor
                state.error = f"cannot load model {model.name!r}: {remote_message(exc)}"
                self.queues[model.label].clear()
                _say(f"[{model.label}] {state.error}")
                return
            state.lost_loads += 1  # the actor was lost (killed, node gone) while loading
            if state.lost_loads >= MAX_LOAD_ATTEMPTS:
                state.error = (f"{MAX_LOAD_ATTEMPTS} actors died while loading model {model.name!r}: "
                               f"{first_line(exc)}")
                self.queues[model.label].clear()
                _say(f"[{model.label}] giving up: {state.error}")
                return
            _say(f"[{model.label}] an actor died while loading the model; starting another")
            self._start_actor(model)
            return
        if not state.ready:
            state.ready = True
            _say(f"[{model.label}] model loaded")
        self.first_ready = self.first_ready or time.time()
        self._dispatch(model, actor)

    def _finished(self, ref) -> None:
        model, actor, task = self.in_flight.pop(ref)
        state = self.progress[model.label]
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            state.attempts[task.ids] = state.attempts.get(task.ids, 0) + 1
            if state.attempts[task.ids] >= MAX_SHARD_ATTEMPTS:
                state.error = (f"shard of {len(task.prompts)} prompts failed {MAX_SHARD_ATTEMPTS} times: "
                               f"{first_line(exc)}")
                _say(f"[{model.label}] giving up: {state.error}")
                return
            _say(f"[{model.label}] actor died ({first_line(exc)}); replacing it and redoing its shard")
            self.queues[model.label].insert(0, task)
            self._start_actor(model)
            return
        except self.ray.exceptions.RayTaskError as exc:
            state.error = f"shard failed: {remote_message(exc)}"
            _say(f"[{model.label}] {state.error}")
            return
        state.prompts_done += result.prompts
        state.failed_prompts += result.failed
        state.cells += result.cells
        if self.on_shard_done is not None:
            self.on_shard_done(model.label, result)
        self._dispatch(model, actor)

    def drive(self, progress_every: float) -> None:
        """Until every shard is stored or given up: wait for the next event, report progress."""
        start = last_report = time.time()
        while self.in_flight or self.starting:
            done, _ = self.ray.wait(list(self.in_flight) + list(self.starting), num_returns=1,
                                    timeout=progress_every)
            for ref in done:
                (self._ready if ref in self.starting else self._finished)(ref)
            if time.time() - last_report >= progress_every or not (self.in_flight or self.starting):
                last_report = time.time()
                self.report(start)

    def report(self, start: float) -> None:
        """One progress line. The rate and ETA count only prompts computed in this run, since
        the first model finished loading (loading and resumed prompts would skew them)."""
        live = [p for p in self.progress.values() if p.error is None]
        if not live:
            return  # every model failed: its own line said why
        now = time.time()
        total = sum(p.prompts_total for p in live)
        done = sum(p.prompts_done for p in live)
        if self.first_ready is None:
            _say(f"progress: loading models, {done}/{total} prompts already in the store, "
                 f"elapsed {now - start:.0f} s")
            return
        computed = sum(p.prompts_done - p.resumed for p in self.progress.values())
        working = max(now - self.first_ready, 1e-9)
        cells = sum(p.cells for p in self.progress.values())
        eta = f"{(total - done) * working / computed:.0f} s" if computed and total > done else "-"
        _say(f"progress: {done}/{total} prompts, {cells / working:.0f} cells/s, elapsed {now - start:.0f} s, "
             f"ETA {eta}")

    def kill_all(self) -> None:
        for _model, actor, _shard in self.in_flight.values():
            self.ray.kill(actor)
        for _model, actor in self.starting.values():
            self.ray.kill(actor)


def run(cfg, store_uri: str | None = None, progress_every: float = 10.0,
        num_cpus: int | None = None, on_shard_done=None) -> dict:
    """Run an experiment config on Ray (RAY_ADDRESS, or a local instance). Returns a summary dict.

    `on_shard_done(label, ShardResult)` is called in the driver after each stored shard.
    If the driver itself fails, the run is marked failed; running it again resumes.
    """
    plan = RunPlan(cfg, store_uri)
    ray, started_here = _init_ray(num_cpus)
    start = time.time()
    scheduler = None
    try:
        with plan.running():
            try:
                scheduler = Scheduler(ray, plan, on_shard_done)
                scheduler.drive(progress_every)
            except BaseException:
                if scheduler is not None:
                    scheduler.kill_all()
                raise
            progress = scheduler.progress
            failed_models = {label: p.error for label, p in progress.items() if p.error}
            status = "failed" if failed_models else "completed"
            plan.mark(status)
    finally:
        if started_here:  # a Ray this call started is not left behind (the report needs none)
            ray.shutdown()
    elapsed = time.time() - start
    _say(f"run {plan.run_id} {status}: {sum(p.prompts_done for p in progress.values())} prompt x model "
         f"results, {sum(p.failed_prompts for p in progress.values())} failed prompts, "
         f"{sum(p.cells for p in progress.values())} cells in {elapsed:.1f} s"
         + "".join(f"; model {k} failed: {v}" for k, v in failed_models.items()))
    return {"run_id": plan.run_id, "status": status, "failed_models": failed_models, "store": plan.store_uri,
            "progress": progress, "seconds": elapsed,
            "prompts": sum(p.prompts_total for p in progress.values()),
            "failed_prompts": sum(p.failed_prompts for p in progress.values()),
            "seconds_after_first_actor_ready": time.time() - (scheduler.first_ready or start)}
