"""The Jacobian lens's fit inside `klstore lens fit` (run/fit.py's workers), sharded and resumable.

The prompts are the corpus's packed training sequences, cut into shards of `shard_size`
prompts. Worker `r` of `world` takes shards r, r + world, ...; each shard's partial sum of
J_l(prompt) (float64) and its prompt counts are written into the store as
`<store>/lens_fits/<fit id>/jacobian-<shard index>.pt` with a checksum, so a killed fit resumes
without recomputing finished shards. Every worker then merges all shard files in index order
(the merge is a prompt-weighted sum, exact and order-independent up to float64 rounding) and
gets the same lens. With `source_layers` the sums hold those blocks' rows only (the shard
files say which); the fit id includes it, so a resume never mixes two sets of blocks.
"""

from __future__ import annotations

import hashlib
import io
import time

import torch

from klstore.core import jacobian, lenses
from klstore.errors import KlstoreError
from klstore.run.holds import hold
from klstore.store.tables import Store

FITS = "lens_fits"


def shard_path(store: Store, fit_id: str, index: int) -> str:
    return store.path(FITS, fit_id, f"jacobian-{index:06d}.pt")


def shards_of(n_prompts: int, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, n_prompts)) for start in range(0, n_prompts, shard_size)]


def fit(recipe, store: Store, fit_id: str, model, adapter, train: torch.Tensor, log, rank: int, world: int):
    """The merged JacobianSums over every training sequence (`recipe`: spec.JacobianRecipe)."""
    n_layers, d_model = adapter.n_layers, model.get_input_embeddings().weight.shape[1]
    blocks = jacobian.source_blocks(recipe.source_layers, n_layers)
    if blocks is not None:
        log(f"jacobian: fitting source blocks {lenses.spans(blocks)} of {n_layers} ({recipe.source_layers!r})")
    shards = shards_of(train.shape[0], recipe.shard_size)
    mine = [i for i in range(rank, len(shards), world) if not store.exists_file(shard_path(store, fit_id, i))]
    todo = sum(len(shards[i]) for i in mine)
    if len(mine) < len(range(rank, len(shards), world)):
        log(f"jacobian: resuming, {len(shards) - len(mine) * world} shard(s) already in the store")
    device = next(model.parameters()).device
    started, done = time.perf_counter(), 0
    for index in mine:
        sums = jacobian.JacobianSums.zeros(n_layers, d_model, blocks)
        for row in shards[index]:
            ids = train[row : row + 1]
            if recipe.max_len is not None:
                ids = ids[:, : recipe.max_len]
            sums.add(jacobian.prompt_jacobian(model, adapter, ids.to(device), recipe.skip, recipe.dim_batch, blocks))
            done += 1
            rate = done / max(1e-9, time.perf_counter() - started)
            eta = (todo - done) / rate
            log(f"jacobian: {done}/{todo} prompts on this worker, {rate * world:.2f} prompts/s, ETA {eta:.0f} s")
        _write(store, shard_path(store, fit_id, index), sums)
        hold(f"jacobian-shard-{index}")
    _barrier()
    merged = jacobian.JacobianSums.zeros(n_layers, d_model, blocks)
    for index in range(len(shards)):
        path = shard_path(store, fit_id, index)
        try:
            merged.merge(_read(store, path))
        except ValueError as exc:  # a shard of other blocks: written by an older klstore under this fit id
            raise KlstoreError(f"{path}: {exc} (delete the fit's folder to fit again)") from None
    if merged.prompts == 0:
        raise KlstoreError(f"no prompt has a valid position: every one has at most {recipe.skip + 1} tokens")
    return merged


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _write(store: Store, path: str, sums: jacobian.JacobianSums) -> None:
    buffer = io.BytesIO()
    state = {"total": sums.total, "prompts": sums.prompts, "skipped": sums.skipped}
    if sums.blocks is not None:
        state.update(blocks=list(sums.blocks), n_layers=sums.n_layers)
    torch.save(state, buffer)
    data = buffer.getvalue()
    store.put_bytes(path, data)  # atomic: a kill leaves no half-written shard
    store.put_bytes(path + ".sha256", hashlib.sha256(data).hexdigest().encode())


def _read(store: Store, path: str) -> jacobian.JacobianSums:
    data = store.read_bytes(path)
    if data is None:
        raise KlstoreError(f"{path} is missing: a worker did not finish its shards")
    record = store.read_bytes(path + ".sha256")
    if record is not None and hashlib.sha256(data).hexdigest() != record.decode().strip():
        raise KlstoreError(f"{path}: checksum mismatch (delete it to recompute the shard)")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    blocks = state.get("blocks")
    return jacobian.JacobianSums(
        state["total"],
        int(state["prompts"]),
        int(state["skipped"]),
        [path],
        blocks=None if blocks is None else tuple(int(b) for b in blocks),
        n_layers=int(state.get("n_layers", 0)),
    )
