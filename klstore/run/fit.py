"""`klstore lens fit CONFIG`: a lens fitted over Ray Train workers, with its provenance in the store.

The fit is a run like a kl run: its id is its name plus a hash of what defines it
(`FitSpec.identity`), its checkpoints sit under `<store>/lens_fits/<fit id>/`, and a fit run
again resumes from the last checkpoint (or, finished, returns its lenses at once).

Every worker of Ray Train's `TorchTrainer` loads the model and the corpus (the same packing
everywhere: no data moves between processes) and takes the sequences `rank, rank + world, ...`
of each step:
1. least squares (kind least_squares, or the tuned lens's start): each worker sums the normal
   equations of its sequences; the sums are added over the process group and solved;
2. tuned: DistributedDataParallel over the translators (gloo on CPU, NCCL on GPUs), SGD with
   Nesterov momentum, tuned-lens's schedule. Each worker scales its loss by world / sequences
   per step, so DDP's mean of the gradients is the gradient of the step's mean loss, whatever
   the number of workers;
3. evaluation on the held-out split: the logit lens and each fitted lens, per layer.
Rank 0 writes checkpoints, lens files, and the `lenses` and `lens_eval` rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from typing import TypedDict

from klstore.errors import KlstoreError
from klstore.run.holds import hold
from klstore.spec import FitSpec, check_label, model_label
from klstore.store.tables import Store, open_store

FITS = "lens_fits"  # <store>/lens_fits/<fit id>/checkpoint.pt (+ its checksum record)


class _LensMeta(TypedDict):
    """What every lens of a fit records of its base model (lenses.AffineLens fields)."""

    unembed_hash: str
    model: str


def fit_id_for(spec: FitSpec) -> str:
    digest = hashlib.sha256(json.dumps(spec.identity(), sort_keys=True).encode()).hexdigest()[:10]
    return f"{check_label(spec.name, 'fit name')}-{digest}"


def steps_of(spec: FitSpec) -> tuple[int, int]:
    """(training steps, sequences per step) of a tuned fit."""
    assert spec.train is not None
    per_step = max(1, spec.train.tokens_per_step // spec.corpus.seq_len)
    return max(1, math.ceil(spec.train.tokens / (per_step * spec.corpus.seq_len))), per_step


def label_of(spec: FitSpec) -> str:
    """The model's label in the store (its `label:`, else derived from its name)."""
    return check_label(spec.model.label or model_label(spec.model.name), "model label")


def check(spec: FitSpec) -> None:
    """What can be checked before Ray starts and any model loads."""
    label_of(spec)
    if spec.kind == "tuned":
        _, per_step = steps_of(spec)
        if per_step < spec.workers:
            raise KlstoreError(
                f"train: tokens_per_step gives {per_step} sequence(s) of {spec.corpus.seq_len} tokens per step, "
                f"fewer than the {spec.workers} workers (each needs at least one)"
            )
    if spec.kind == "jacobian" and spec.jacobian.source_layers is not None:
        from klstore.core.jacobian import source_blocks
        from klstore.core.models import read_shape

        shape = read_shape(spec.model.name, spec.model.trust_remote_code)
        if shape is not None:  # a hub id is not read here: the workers check the same
            source_blocks(spec.jacobian.source_layers, shape.n_layers, label_of(spec))


def read_corpus(spec: FitSpec, tokenizer=None):
    """The packed corpus (klstore.core.corpus), with the model's tokenizer: the driver reads it
    before Ray starts, so a bad corpus fails before anything is written; each worker again."""
    from klstore.core import corpus
    from klstore.core.models import load_tokenizer

    return corpus.load_corpus(
        spec.corpus.path,
        tokenizer or load_tokenizer(spec.model.name, spec.model.trust_remote_code),
        spec.corpus.seq_len,
        spec.corpus.held_out,
        max_train_sequences=spec.corpus.train_sequences,
        text_field=spec.corpus.text_field,
        dataset_split=spec.corpus.split,
        max_documents=spec.corpus.max_documents,
    )


def fit(spec: FitSpec, store_uri: str | None = None, say=lambda message: print(message, file=sys.stderr)) -> dict:
    """Run (or resume) the fit; returns {fit_id, lenses: [{id, kind}], eval: rows}."""
    check(spec)
    data = read_corpus(spec)
    say(
        f"corpus {data.source}: {data.train.shape[0]} training and {data.held_out.shape[0]} held-out "
        f"sequences of {spec.corpus.seq_len} tokens"
    )
    store = open_store(store_uri or spec.store, create=True)
    fit_id = fit_id_for(spec)
    done = _finished(store, fit_id)
    if done is not None:
        say(f"fit {fit_id} is already in the store: nothing to do")
        return done
    from klstore.run import runner

    config = {"spec": _absolute(spec).model_dump(), "store": _store_uri(store), "fit_id": fit_id}

    def announce(use_gpu: bool) -> None:
        say(
            f"fit {fit_id}: {spec.kind} lens of {spec.model.name} on {spec.corpus.path}, "
            f"{spec.workers} Ray Train worker(s) ({'GPU' if use_gpu else 'CPU'})"
        )

    started = time.perf_counter()
    try:
        with _FitProgress(store, fit_id, say):
            runner.train(train_worker, config, spec.workers, spec.model.device, fit_id, _ray_storage(), announce)
    except KlstoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - the worker's own message, in one line
        raise KlstoreError(f"lens fit {fit_id} failed: {_worker_error(exc)}") from None
    say(f"fit {fit_id} done in {time.perf_counter() - started:.0f} s")
    result = _finished(store, fit_id)
    if result is None:
        raise KlstoreError(f"lens fit {fit_id} ended without writing its record (see the log above)")
    return result


def _worker_error(exc: BaseException) -> str:
    """The line that says why a Ray Train worker failed: its own `SomethingError: ...` line (a
    KlstoreError's message as is), else Ray's out-of-memory kill in plain words, else the first line."""
    import re

    from klstore.errors import first_line, remote_message

    text = str(exc)
    if "KlstoreError: " in text or "CorpusError: " in text or "LensError: " in text:
        return remote_message(exc).split("Error: ", 1)[-1]
    wrappers = ("WorkerGroupError", "TrainingFailedError", "RayTaskError", "ActorDiedError")
    lines = [
        line.strip()
        for line in text.splitlines()
        if re.match(r"^[\w.]*(Error|Exception): \S", line.strip()) and not line.strip().startswith(wrappers)
    ]
    if lines:
        return lines[-1]
    if "memory" in text.lower() and "kill" in text.lower():
        return (
            "a worker was killed for lack of memory (Ray's memory monitor): use fewer workers, a smaller "
            "batch_size or dim_batch, or a machine with more memory"
        )
    return first_line(exc)


def _progress_path(store: Store, fit_id: str) -> str:
    return store.path(FITS, fit_id, "progress.txt")


class _FitProgress:
    """The driver's view of rank 0's progress lines, which it writes into the store (a few
    lines, replaced each time): a thread prints every new line while the fit runs."""

    def __init__(self, store: Store, fit_id: str, say, poll: float = 1.0):
        import threading

        self.store, self.fit_id, self.say, self.poll = store, fit_id, say, poll
        self.printed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.poll):
            self._show()

    def _show(self) -> None:
        data = self.store.read_bytes(_progress_path(self.store, self.fit_id))
        lines = [] if data is None else data.decode().splitlines()
        count, fresh = (int(lines[0]), lines[1:]) if lines else (0, [])
        new = count - self.printed  # lines written since the last look (the file keeps the last ones)
        for line in fresh[max(0, len(fresh) - new) :]:
            self.say(line)
        self.printed = max(self.printed, count)

    def __enter__(self):
        self.store.delete(_progress_path(self.store, self.fit_id))
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._show()
        return False


def _absolute(spec: FitSpec) -> FitSpec:
    """The spec with local corpus and model paths made absolute: Ray Train runs each worker in
    a folder of its own (the fit's id was taken from the paths as written)."""
    corpus, model = spec.corpus, spec.model
    if os.path.exists(os.path.expanduser(corpus.path)):
        corpus = corpus.model_copy(update={"path": os.path.abspath(os.path.expanduser(corpus.path))})
    if os.path.exists(os.path.expanduser(model.name)):
        model = model.model_copy(update={"name": os.path.abspath(os.path.expanduser(model.name))})
    return spec.model_copy(update={"corpus": corpus, "model": model})


def _store_uri(store: Store) -> str:
    return store.uri if not store.is_local else os.path.abspath(store.uri)


def _ray_storage() -> str:
    from klstore.core.models import cache_dir

    path = cache_dir() / "ray_train"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _finished(store: Store, fit_id: str) -> dict | None:
    data = store.read_bytes(store.path(FITS, fit_id, "result.json"))
    return None if data is None else json.loads(data)


# ------------------------------------------------------------------ in each worker
def train_worker(config: dict) -> None:
    """The body of every Ray Train worker (see the module docstring)."""
    import torch

    from klstore.core import fitting, lenses
    from klstore.core.adapter import Adapter
    from klstore.core.models import load_model, quiet_libraries

    quiet_libraries()
    spec = FitSpec.model_validate(config["spec"])
    store = open_store(config["store"], create=True)
    fit_id = config["fit_id"]
    from klstore.run.runner import train_rank

    rank, world = train_rank()
    started = time.perf_counter()
    loaded = load_model(
        spec.model.name,
        device=spec.model.device,
        dtype=spec.model.dtype,
        trust_remote_code=spec.model.trust_remote_code,
    )
    model = loaded.model
    model.requires_grad_(False)
    adapter = Adapter.discover(model)
    data = read_corpus(spec, loaded.tokenizer)
    n_layers, d_model = adapter.n_layers, model.get_output_embeddings().weight.shape[1]
    meta: _LensMeta = {"unembed_hash": lenses.unembed_hash(model), "model": spec.model.name}
    provenance = {
        "model_fingerprint": lenses.model_fingerprint(model),
        "corpus": data.source,
        "corpus_hash": data.split_hash("train"),
        "held_out_hash": data.split_hash("held_out"),
        "fit_id": fit_id,
    }
    device = loaded.device

    def batches(rows: torch.Tensor):
        for start in range(0, rows.shape[0], spec.batch_size):
            yield rows[start : start + spec.batch_size].to(device)

    last_said, said = [0.0], []

    def log(message: str, every: float = 0.0) -> None:
        """Rank 0's progress line (at most one per `every` seconds when given), for the driver
        (`_FitProgress`): the count of lines so far, then the last 20."""
        now = time.perf_counter()
        if rank == 0 and now - last_said[0] >= every:
            last_said[0] = now
            said.append(f"[{fit_id}] {message}")
            text = "\n".join([str(len(said)), *said[-20:]]) + "\n"
            store.put_bytes(_progress_path(store, fit_id), text.encode())

    fitted: list[tuple[lenses.AffineLens, dict]] = []
    start_lens = lenses.identity_lens("tuned", n_layers, d_model, **meta)
    if spec.kind == "least_squares" or (spec.kind == "tuned" and spec.init == "least_squares"):
        sums = fitting.NormalSums.zeros(n_layers, d_model)
        mine = data.train[rank::world]
        for i, ids in enumerate(batches(mine)):
            outputs, _ = fitting.block_states(model, adapter, ids)
            sums.add(outputs)
            log(f"least squares: {min((i + 1) * spec.batch_size, mine.shape[0])}/{mine.shape[0]} sequences", 10.0)
        _all_sum(sums.xtx, sums.xty)
        tokens = int(_all_sum(torch.tensor([float(sums.tokens)]))[0])
        least = sums.solve(**meta)
        fitted.append((least, {"recipe": {"kind": "least_squares"}, "tokens": tokens, "loss": None}))
        start_lens = lenses.AffineLens("tuned", least.weight, least.bias, **meta)
        log(f"least squares: solved on {tokens} tokens (lens {least.id})")
    if spec.kind == "tuned":
        tuned, record = _train_tuned(spec, store, fit_id, model, adapter, data, start_lens, batches, log, meta)
        fitted.append((tuned, record))
    if spec.kind == "jacobian":
        from klstore.run import jacobian_fit

        sums = jacobian_fit.fit(spec.jacobian, store, fit_id, model, adapter, data.train, log, rank, world)
        recipe = {"kind": "jacobian", **spec.jacobian.identity(), "prompts": sums.prompts}
        recipe["skipped_prompts"] = sums.skipped
        if sums.blocks is not None:
            recipe["blocks"] = list(sums.blocks)
        fitted.append((sums.lens(**meta), {"recipe": recipe, "tokens": data.n_train_tokens, "loss": None}))
        log(f"jacobian: merged {sums.prompts} prompt(s) ({sums.skipped} without a valid position)")
    evaluation = _evaluate(model, adapter, [None] + [lens for lens, _ in fitted], batches(data.held_out[rank::world]))
    if rank == 0:
        _write_results(
            store, spec, fit_id, fitted, evaluation, provenance, world, time.perf_counter() - started, label_of(spec)
        )


def _all_sum(*tensors):
    """Sum tensors over the workers' process group (Ray Train's), in place; returns the last."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in tensors:
            dist.all_reduce(tensor)
    return tensors[-1]


def _train_tuned(spec, store, fit_id, model, adapter, data, start_lens, batches, log, meta):
    """SGD over the translators, DDP across workers; checkpoints in the store every
    `checkpoint_every` steps, resumed from the last one."""
    import torch

    from klstore.core import fitting
    from klstore.run.runner import prepare_ddp, train_rank

    recipe = spec.train
    steps, per_step = steps_of(spec)
    translators = fitting.Translators(start_lens)
    checkpoint = _read_checkpoint(store, fit_id)
    optimizer_state, first_step, losses = None, 0, []
    if checkpoint is not None:
        translators.load_state_dict(checkpoint["translators"])
        optimizer_state, first_step, losses = checkpoint["optimizer"], checkpoint["step"], checkpoint["losses"]
        log(f"resuming at step {first_step} of {steps}")
    model_ddp = prepare_ddp(translators)
    optimizer = fitting.sgd(translators.parameters(), recipe.lr, recipe.momentum, recipe.weight_decay, recipe.nesterov)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    rank, world = train_rank()
    n_train = data.train.shape[0]
    started, seen = time.perf_counter(), 0
    for step in range(first_step, steps):
        order = _order(n_train, recipe.seed, step * per_step, per_step)
        rows = data.train[order][rank::world]
        for group in optimizer.param_groups:
            group["lr"] = fitting.learning_rate(step, recipe.lr, recipe.warmup_steps, steps)
        optimizer.zero_grad(set_to_none=True)
        micro = list(batches(rows))
        total = torch.zeros(())
        for i, ids in enumerate(micro):
            outputs, final_logp = fitting.block_states(model, adapter, ids)
            sync = i == len(micro) - 1
            with _no_sync(model_ddp, not sync):
                loss = model_ddp(adapter, outputs, final_logp) * (ids.shape[0] * world / per_step)
                loss.backward()
            total += loss.detach() / world
        step_loss = float(_all_sum(total.reshape(1))[0])
        torch.nn.utils.clip_grad_norm_(translators.parameters(), recipe.max_grad_norm)
        optimizer.step()
        losses.append(step_loss)
        seen += per_step * spec.corpus.seq_len
        rate = seen / max(1e-9, time.perf_counter() - started)
        eta = (steps - step - 1) * per_step * spec.corpus.seq_len / max(rate, 1e-9)
        log(f"step {step + 1}/{steps}: loss {step_loss:.4f}, {rate:.0f} tokens/s, ETA {eta:.0f} s")
        if (step + 1) % spec.checkpoint_every == 0 or step + 1 == steps:
            if rank == 0:
                _write_checkpoint(store, fit_id, translators, optimizer, step + 1, losses)
            hold(f"tuned-step-{step + 1}")
    lens = translators.lens("tuned", **meta)
    tokens = steps * per_step * spec.corpus.seq_len
    return lens, {
        "recipe": {"kind": "tuned", "init": spec.init, **recipe.model_dump()},
        "tokens": tokens,
        "loss": losses[-1] if losses else None,
    }


class _no_sync:
    """DDP's no_sync() when `skip` (gradients accumulate locally), else nothing."""

    def __init__(self, module, skip: bool):
        self.inner = module.no_sync() if skip and hasattr(module, "no_sync") else None

    def __enter__(self):
        return self.inner.__enter__() if self.inner is not None else None

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc) if self.inner is not None else False


def _order(n_train: int, seed: int, start: int, count: int):
    """Training sequence indices start .. start+count of an endless stream of seeded permutations
    (one per pass over the corpus), so any step's batch is known without replaying the others."""
    import torch

    out = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, n_train)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n_train, generator=generator)[offset]))
    return torch.tensor(out, dtype=torch.long)


def _checkpoint_path(store: Store, fit_id: str) -> str:
    return store.path(FITS, fit_id, "checkpoint.pt")


def _read_checkpoint(store: Store, fit_id: str):
    import torch

    data = store.read_bytes(_checkpoint_path(store, fit_id))
    if data is None:
        return None
    record = store.read_bytes(_checkpoint_path(store, fit_id) + ".sha256")
    if record is not None and hashlib.sha256(data).hexdigest() != record.decode().strip():
        raise KlstoreError(f"{_checkpoint_path(store, fit_id)}: checksum mismatch (delete it to start over)")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _write_checkpoint(store: Store, fit_id: str, translators, optimizer, step: int, losses: list) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(
        {"translators": translators.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "losses": losses},
        buffer,
    )
    data = buffer.getvalue()
    store.put_bytes(_checkpoint_path(store, fit_id), data)  # atomic: a kill leaves the previous one
    store.put_bytes(_checkpoint_path(store, fit_id) + ".sha256", hashlib.sha256(data).hexdigest().encode())


def _evaluate(model, adapter, lens_list, batches) -> list[list]:
    """Per lens (None: logit) the per-layer held-out sums, added over the workers."""
    import torch

    from klstore.core import fitting

    batches = list(batches)
    out = []
    for lens in lens_list:
        sums = fitting.evaluate(model, adapter, lens, batches)
        if not sums:
            sums = [fitting.LayerEval() for _ in range(adapter.n_layers)]
        packed = torch.tensor([[s.kl_sum, s.top1_sum, s.tokens] for s in sums], dtype=torch.float64)
        _all_sum(packed)
        out.append([fitting.LayerEval(float(k), int(t1), int(n)) for k, t1, n in packed.tolist()])
    return out


def _write_results(store, spec, fit_id, fitted, evaluation, provenance, world, wall_s, label) -> None:
    from klstore.core import lenses
    from klstore.run import lenses as lens_store
    from klstore.run import records

    created = datetime.now(timezone.utc)
    ids = [("logit", "logit")]
    readable: list = [None] + [set(lens.readable) for lens, _ in fitted]  # lens_eval rows where a lens reads
    rows = []
    for lens, record in fitted:
        folder = _local_tmp(fit_id, lens.id)
        lenses.save(lens, folder, provenance={**provenance, "recipe": record["recipe"]})
        lens_store.put(store, folder, lens.id)
        ids.append((lens.kind, lens.id))
        rows.append(
            dict(
                lens_id=lens.id,
                kind=lens.kind,
                model=label,
                model_name=spec.model.name,
                fingerprint=provenance["model_fingerprint"],
                unembed_hash=lens.unembed_hash,
                corpus=provenance["corpus"],
                corpus_hash=provenance["corpus_hash"],
                held_out_hash=provenance["held_out_hash"],
                recipe=json.dumps(record["recipe"], sort_keys=True),
                tokens=record["tokens"],
                wall_s=wall_s,
                workers=world,
                final_loss=record["loss"],
                fit_id=fit_id,
                created_at=created,
            )
        )
    for row in rows:
        store.write("lenses", records.lens_rows([row]), f"lens-{row['lens_id']}.parquet", model=label)
    eval_rows = []
    for (kind, lens_id), layers, reads in zip(ids, evaluation, readable):
        for layer, numbers in enumerate(layers):
            if reads is not None and layer not in reads:
                continue
            eval_rows.append(
                dict(
                    lens_id=lens_id,
                    lens=kind,
                    layer=layer,
                    kl=numbers.kl,
                    top1_agreement=numbers.top1,
                    tokens=numbers.tokens,
                    held_out_hash=provenance["held_out_hash"],
                    fingerprint=provenance["model_fingerprint"],
                    fit_id=fit_id,
                )
            )
    store.write("lens_eval", records.lens_eval_rows(eval_rows), f"eval-{fit_id}.parquet", model=label)
    result = {
        "fit_id": fit_id,
        "model": label,
        "lenses": [{"kind": kind, "id": lens_id} for kind, lens_id in ids],
        "eval": [
            {k: v for k, v in row.items() if k in ("lens", "lens_id", "layer", "kl", "top1_agreement", "tokens")}
            for row in eval_rows
        ],
    }
    store.put_bytes(store.path(FITS, fit_id, "result.json"), json.dumps(result, indent=1).encode())


def _local_tmp(fit_id: str, lens_id: str):
    from klstore.core.models import cache_dir

    folder = cache_dir() / "lens_written" / fit_id / lens_id
    folder.mkdir(parents=True, exist_ok=True)
    os.utime(folder)
    return folder
