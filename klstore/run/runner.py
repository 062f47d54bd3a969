"""The Ray executor: the only module that imports ray.

One model copy per actor (a `Worker` wrapped as a Ray actor); shards of prompts are
handed out one at a time as actors become free, so a slow actor never holds the run
back; each actor writes its shards' rows straight into the store. The run's identity,
shards, resume and `runs` row come from klstore.run.plan, as for `compute --store`.

Before any actor starts, the config is checked against the joined cluster's alive nodes
(plan.check_cluster): an actor larger than every node, a local-folder store on several
nodes. Each shard attempt becomes a row of the `shards` table: the actor writes its
successful ones, the scheduler those whose actor died ("lost") or that raised ("failed").

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
from datetime import datetime, timezone

from klstore.errors import KlstoreError, first_line, remote_message
from klstore.run.plan import RunPlan, actor_count, actor_cpus, check_cluster, shard_key, uses_gpus
from klstore.run.worker import Worker

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
        raise KlstoreError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


# Ray's switch for multi-node support (on by default on Linux). With it on, Ray replaces a
# loopback node address with the machine's network address and its servers listen on every
# interface (ray._private.services.resolve_ip_for_localhost); with it off (Ray's single-node
# mode, the default on macOS and Windows) every server of the node listens on 127.0.0.1. Ray
# reads it when `ray` is first imported, and the node's processes inherit it.
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _single_node_mode() -> None:
    """Check that the local Ray about to start is in Ray's single-node mode (every server on
    loopback): `init_ray` sets it before importing ray; a `ray` imported earlier with
    multi-node support on is one line."""
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise KlstoreError(
            f"ray was imported before klstore started its local Ray, with multi-node support "
            f"on, so the local Ray would listen on the network: set {SINGLE_NODE_ENV}=0 "
            "before importing ray (or start Ray yourself, or set RAY_ADDRESS)"
        )


def init_ray(num_cpus: int | None = None, log_to_driver: bool = True):
    """Join the cluster named by RAY_ADDRESS, or start a local Ray that listens on loopback
    only (`_single_node_mode`). Returns the ray module and whether this call started it (the
    caller then shuts it down). `log_to_driver`: stream the workers' output here (a lens fit
    reports its progress through the store instead, without Ray Train's own chatter)."""
    address = os.environ.get("RAY_ADDRESS")
    if not address and "ray" not in sys.modules:
        os.environ[SINGLE_NODE_ENV] = "0"  # before ray reads it on import
    import ray

    if ray.is_initialized():
        return ray, False
    try:
        if address:
            _check_reachable(address)
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            # a Ray of its own serves this machine only: it listens on loopback, not the network
            _single_node_mode()
            ray.init(
                num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver, _node_ip_address="127.0.0.1"
            )
    except KlstoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to join is one line for the user
        message = first_line(exc)
        if (
            any(word in str(exc).lower() for word in ("unauthenticated", "auth", "token"))
            and os.environ.get("RAY_AUTH_MODE") != "token"
        ):
            message += (
                " - the cluster uses token authentication: set RAY_AUTH_MODE=token and put its "
                "token in ~/.ray/auth_token (or RAY_AUTH_TOKEN)"
            )
        raise KlstoreError(f"cannot start or join Ray ({address or 'local'}): {message}") from None
    return ray, True


# ------------------------------------------------------------------ Ray Train (lens fits)
def train(worker, config: dict, workers: int, device: str, name: str, storage: str, announce) -> None:
    """Run `worker(config)` in `workers` Ray Train workers (TorchTrainer: DDP, gloo on CPU, NCCL
    on GPUs) on the joined cluster or a local loopback Ray started here (its workers' output not
    streamed: a lens fit reports through the store). GPUs when the cluster has one per worker;
    on CPUs each worker gets its share of them. `announce(use_gpu)` before it starts."""
    import math

    ray, started_here = init_ray(log_to_driver=False)
    try:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        cpus = ray.cluster_resources().get("CPU", 1.0)
        gpus = ray.cluster_resources().get("GPU", 0.0)
        use_gpu = gpus >= workers and device in ("auto", "cuda")
        per_worker = {"CPU": 1.0} if use_gpu else {"CPU": max(1.0, math.floor(cpus / workers))}
        announce(use_gpu)
        TorchTrainer(
            worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
            run_config=RunConfig(name=name, storage_path=storage),
        ).fit()
    finally:
        if started_here:
            ray.shutdown()


def train_rank() -> tuple[int, int]:
    """Inside a Ray Train worker: (its rank, the number of workers)."""
    import ray.train

    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


def prepare_ddp(module):
    """Inside a Ray Train worker: `module` on its device, wrapped in DDP when there are several."""
    import ray.train.torch

    return ray.train.torch.prepare_model(module, move_to_device=True)


def cluster_nodes(ray) -> list[dict]:
    """The resources of every alive node of the joined cluster, e.g. [{"CPU": 16.0, "GPU": 4.0}]."""
    return [dict(node.get("Resources") or {}) for node in ray.nodes() if node.get("Alive")]


def planning_nodes() -> tuple[list[dict], str]:
    """The nodes a dry run plans for, and where they come from: the cluster at RAY_ADDRESS when
    it is set (joined, read, left; nothing is started on it), else this machine as the one node
    of the local Ray that `klstore run` would start (os.cpu_count() CPUs and torch's CUDA
    devices), without starting Ray: a dry run should cost nothing."""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray, started_here = init_ray()
        try:
            return cluster_nodes(ray), f"the cluster at RAY_ADDRESS={address}"
        finally:
            if started_here:
                ray.shutdown()  # leaves the cluster; it stops nothing there
    import torch

    node = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    return [node], "this machine (no Ray started; the local Ray that `klstore run` would start)"


def actor_options(model, cpus: float, gpus: bool) -> dict:
    """The Ray options of one actor of `model`: its CPUs, and `num_gpus` when it uses GPUs."""
    options = {"num_cpus": cpus, "max_restarts": 0}
    if gpus:
        options["num_gpus"] = model.num_gpus
    return options


def device_map_for(model):
    """The model's device_map, or "balanced" for an actor with several GPUs (Ray gives it
    CUDA_VISIBLE_DEVICES = its own GPUs, so accelerate splits the blocks over exactly those)."""
    if model.device_map is not None:
        return model.device_map
    return "balanced" if model.num_gpus > 1 and model.device != "cpu" else None


class RayWorker(Worker):
    """The Worker as a Ray actor: the same class, recording its Ray actor id and node
    (`<host>/<Ray node id, 12 hex>`: several nodes can share a host) in the `shards` table."""

    def __init__(self, *args, **kwargs):
        import socket

        import ray

        context = ray.get_runtime_context()
        actor = context.get_actor_id()
        assert actor is not None, "RayWorker runs only as a Ray actor (ray.remote)"
        kwargs.update(actor=actor, node=f"{socket.gethostname()}/{context.get_node_id()[:12]}")
        super().__init__(*args, **kwargs)


def _raised_in_init(exc) -> bool:
    """Whether an actor died of an exception in Worker.__init__ (the model cannot load),
    rather than being lost (killed, its node gone)."""
    return bool(getattr(exc, "actor_init_failed", False))


class Scheduler:
    """Hands shards to actors per model; replaces dead actors; tracks progress.

    State: `queues` (shards still to hand out, per model), `in_flight` (shard task ->
    model, actor, ShardTask, where the actor runs, when the shard started), `starting`
    (actor readiness -> model, actor), `progress`. Each actor records its successful shard
    attempts in the `shards` table itself; the scheduler records the failed and lost ones.
    """

    def __init__(self, ray, plan: RunPlan, on_shard_done=None, nodes: list[dict] | None = None):
        self.ray, self.plan, self.on_shard_done = ray, plan, on_shard_done
        cfg = plan.config
        self.queues: dict[str, list] = {}
        self.progress: dict[str, ModelProgress] = {}
        for model in cfg.models:
            todo = plan.pending(model.label)
            self.queues[model.label] = list(todo)
            resumed = len(cfg.prompts) - sum(len(task.prompts) for task in todo)
            self.progress[model.label] = ModelProgress(
                model.label, len(cfg.prompts), prompts_done=resumed, resumed=resumed
            )
            _say(f"[{model.label}] {len(plan.shards) - len(todo)} of {len(plan.shards)} shards already in the store")
        nodes = cluster_nodes(ray) if nodes is None else nodes
        self.gpus = {m.label: uses_gpus(nodes, m) for m in cfg.models}
        counts = {m.label: min(actor_count(nodes, m, len(cfg.models)), len(self.queues[m.label])) for m in cfg.models}
        self.cpus = {m.label: actor_cpus(nodes, m, sum(counts.values())) for m in cfg.models}
        self.remote_worker = ray.remote(RayWorker)
        self.in_flight: dict = {}
        self.starting: dict = {}
        self.first_ready: float | None = None  # when the first actor had its model loaded
        for model in cfg.models:
            if counts[model.label]:
                for _ in range(counts[model.label]):
                    self._start_actor(model)
                _say(f"[{model.label}] loading model {model.name} on {counts[model.label]} actor(s)")

    def _start_actor(self, model) -> None:
        options = actor_options(model, self.cpus[model.label], self.gpus[model.label])
        actor = self.remote_worker.options(**options).remote(
            model.name,
            model.label,
            self.plan.store_uri,
            device=model.device,
            dtype=model.dtype,
            trust_remote_code=model.trust_remote_code,
            num_threads=max(1, int(self.cpus[model.label])),
            device_map=device_map_for(model),
            max_memory=model.max_memory,
        )
        self.starting[actor.describe.remote()] = (model, actor)  # ready once loaded: node, actor id, device

    def _dispatch(self, model, actor, where: dict) -> None:
        """Give the actor its model's next shard, or let it go when there is none."""
        queue = self.queues[model.label]
        if queue and self.progress[model.label].error is None:
            task = queue.pop(0)
            ref = actor.run_shard.remote(self.plan.run_id, task.prompts, self.plan.job, task.parts)
            self.in_flight[ref] = (model, actor, task, where, datetime.now(timezone.utc))
        else:
            self.ray.kill(actor)

    def _record_attempt(self, model, task, where: dict, started_at, outcome: str, error: str) -> None:
        """The `shards` row of an attempt that did not finish (its actor died, or it raised)."""
        from klstore.run import records

        key = shard_key(task.ids)
        row = records.shard_attempt_row(
            key, where, started_at, datetime.now(timezone.utc), len(task.prompts), None, outcome, error
        )
        self.plan.target.write(
            "shards", row, records.attempt_file_name(key), model=model.label, run_id=self.plan.run_id
        )

    def _ready(self, ref) -> None:
        model, actor = self.starting.pop(ref)
        state = self.progress[model.label]
        try:
            where = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            if _raised_in_init(exc):  # the model itself cannot load: the same on every actor
                state.error = f"cannot load model {model.name!r}: {remote_message(exc)}"
                self.queues[model.label].clear()
                _say(f"[{model.label}] {state.error}")
                return
            state.lost_loads += 1  # the actor was lost (killed, node gone) while loading
            if state.lost_loads >= MAX_LOAD_ATTEMPTS:
                state.error = f"{MAX_LOAD_ATTEMPTS} actors died while loading model {model.name!r}: {first_line(exc)}"
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
        self._dispatch(model, actor, where)

    def _finished(self, ref) -> None:
        model, actor, task, where, started_at = self.in_flight.pop(ref)
        state = self.progress[model.label]
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            self._record_attempt(model, task, where, started_at, "lost", first_line(exc))
            state.attempts[task.ids] = state.attempts.get(task.ids, 0) + 1
            if state.attempts[task.ids] >= MAX_SHARD_ATTEMPTS:
                state.error = (
                    f"shard of {len(task.prompts)} prompts failed {MAX_SHARD_ATTEMPTS} times: {first_line(exc)}"
                )
                _say(f"[{model.label}] giving up: {state.error}")
                return
            _say(f"[{model.label}] actor died ({first_line(exc)}); replacing it and redoing its shard")
            self.queues[model.label].insert(0, task)
            self._start_actor(model)
            return
        except self.ray.exceptions.RayTaskError as exc:
            self._record_attempt(model, task, where, started_at, "failed", remote_message(exc))
            state.error = f"shard failed: {remote_message(exc)}"
            _say(f"[{model.label}] {state.error}")
            return
        state.prompts_done += result.prompts
        state.failed_prompts += result.failed
        state.cells += result.cells
        if self.on_shard_done is not None:
            self.on_shard_done(model.label, result)
        self._dispatch(model, actor, where)

    def drive(self, progress_every: float) -> None:
        """Until every shard is stored or given up: wait for the next event, report progress."""
        start = last_report = time.time()
        while self.in_flight or self.starting:
            done, _ = self.ray.wait(list(self.in_flight) + list(self.starting), num_returns=1, timeout=progress_every)
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
            _say(f"progress: loading models, {done}/{total} prompts already in the store, elapsed {now - start:.0f} s")
            return
        computed = sum(p.prompts_done - p.resumed for p in self.progress.values())
        working = max(now - self.first_ready, 1e-9)
        cells = sum(p.cells for p in self.progress.values())
        eta = f"{(total - done) * working / computed:.0f} s" if computed and total > done else "-"
        _say(f"progress: {done}/{total} prompts, {cells / working:.0f} cells/s, elapsed {now - start:.0f} s, ETA {eta}")

    def kill_all(self) -> None:
        for _model, actor, *_ in self.in_flight.values():
            self.ray.kill(actor)
        for _model, actor in self.starting.values():
            self.ray.kill(actor)


def run(
    cfg, store_uri: str | None = None, progress_every: float = 10.0, num_cpus: int | None = None, on_shard_done=None
) -> dict:
    """Run an experiment config on Ray (RAY_ADDRESS, or a local instance). Returns a summary dict.

    `on_shard_done(label, ShardResult)` is called in the driver after each stored shard.
    If the driver itself fails, the run is marked failed; running it again resumes.
    """
    plan = RunPlan(cfg, store_uri)
    ray, started_here = init_ray(num_cpus)
    start = time.time()
    scheduler = None
    try:
        nodes = cluster_nodes(ray)
        check_cluster(cfg, plan.store_uri, nodes)  # before the run is marked and any actor starts
        with plan.running():
            try:
                scheduler = Scheduler(ray, plan, on_shard_done, nodes)
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
    _say(
        f"run {plan.run_id} {status}: {sum(p.prompts_done for p in progress.values())} prompt x model "
        f"results, {sum(p.failed_prompts for p in progress.values())} failed prompts, "
        f"{sum(p.cells for p in progress.values())} cells in {elapsed:.1f} s"
        + "".join(f"; model {k} failed: {v}" for k, v in failed_models.items())
    )
    return {
        "run_id": plan.run_id,
        "status": status,
        "failed_models": failed_models,
        "store": plan.store_uri,
        "progress": progress,
        "seconds": elapsed,
        "prompts": sum(p.prompts_total for p in progress.values()),
        "failed_prompts": sum(p.failed_prompts for p in progress.values()),
        "seconds_after_first_actor_ready": time.time() - (scheduler.first_ready or start),
    }
