"""Final residual states -> each cell's numbers -> one `KLMatrix` per prompt and probe.

The head pass decodes the states a sweep produced (`sweeps.final_hidden`) into Q_{l,t} and
reduces every cell (layer l, Gen t) to its stored numbers: the divergences from P_t
(klstore.core.divergence), the generated token's rank and log Q, the entropy of Q, and the
top-k lens tokens (docs/conventions.md). Where `unembed.applies` (forward KL alone, a bare
linear head) one vocabulary-chunked pass serves the cells of many prompts at once
(`cells_fused`); otherwise full-vocabulary log Q goes through the row-chunked path
(`cells_rows`), a bounded number of cells at a time.

Memory: neither path holds more than about `chunk_bytes` of logits at a time, never a
[layers x tokens x vocab] tensor.
Shapes: R probe rows, H hidden size, V vocabulary, n generated tokens, k lens tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from klstore.core import divergence, unembed
from klstore.core.generation import Generation
from klstore.core.runtime import ModelRuntime
from klstore.core.tracing import Trace
from klstore.spec import LOGIT_LENS, LensSpec, ProbeSpec, Prompt


@dataclass(frozen=True)
class KLMatrix:
    """One probe's result for one prompt: rows = `layers`, columns = Gen0..Gen{n-1}.

    values[d] is float32 (len(layers), n) for each divergence d asked for, in nats,
    with d(P_t || Q_{l,t}) as defined in klstore.divergence. A non-finite cell is
    NaN here and described in `errors`; it must never be stored as a number.
    """

    model: str
    prompt: Prompt
    probe: str
    probe_params: dict
    layers: tuple[int, ...]
    n_layers_total: int
    generation: Generation
    values: dict[str, np.ndarray]
    top1_match: np.ndarray  # bool (len(layers), n)
    gen_logprob: np.ndarray  # float32 (n,): log P_t(Gen t)
    gen_entropy: np.ndarray  # float32 (n,): entropy of P_t, nats
    errors: tuple[str, ...] = ()
    # What each layer predicts (docs/conventions.md, "Lens tokens"); None when topk = 0.
    topk_ids: np.ndarray | None = None  # int32 (len(layers), n, k): top-k tokens of Q_{l,t}, by rank
    topk_probs: np.ndarray | None = None  # float32 (len(layers), n, k): their probabilities under Q
    gen_rank: np.ndarray | None = None  # int32 (len(layers), n): 1 + #{v: Q(v) > Q(Gen t)}
    gen_logq: np.ndarray | None = None  # float32 (len(layers), n): log Q_{l,t}(Gen t)
    q_entropy: np.ndarray | None = None  # float32 (len(layers), n): H(Q_{l,t}), nats
    # which lens read the rows (docs/conventions.md, "Lenses"): interventions read the model's
    # own output, `logit`; `probe` is then the lens's read-out name (spec.LENS_READOUTS)
    lens: str = "logit"
    lens_id: str = "logit"


@dataclass(frozen=True)
class Reading:
    """What one head pass reads: `probe`'s rows over `layers` (through `lens` for a read-out),
    the divergences asked for, and `topk` lens tokens per cell (0: none)."""

    probe: ProbeSpec
    layers: tuple[int, ...]
    divergences: tuple[str, ...]
    topk: int
    lens: LensSpec = LOGIT_LENS


@dataclass(frozen=True)
class Staged:
    """One prompt's final states for a reading: (R, n, H) `hidden`, R = len(layers)."""

    trace: Trace
    prompt: Prompt
    hidden: torch.Tensor


@dataclass(frozen=True)
class CellValues:
    """One item's cell numbers, each (R, n) unless stated, on the CPU; `gen_logp` and
    `gen_entropy` (n,) where the fused pass computed P's own numbers in its GEMM."""

    values: dict[str, np.ndarray]  # divergence name -> float32 (R, n)
    gen_logq: np.ndarray
    gen_rank: np.ndarray
    topk_ids: np.ndarray | None  # (R, n, k); None when k = 0
    topk_probs: np.ndarray | None
    q_entropy: np.ndarray | None
    gen_logp: np.ndarray | None = None
    gen_entropy: np.ndarray | None = None


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p log p over the last axis, nats, from log-probabilities (p = 0 terms are 0)."""
    return (-(logp.exp() * logp).nan_to_num().sum(-1)).clamp_min(0.0)


def cells_per_chunk(vocab: int, chunk_bytes: int) -> int:
    """How many (row, position) cells of full-vocabulary log-probs fit in `chunk_bytes` on the
    row-chunked path: each costs its float32 log Q plus about seven same-sized temporaries."""
    return max(1, chunk_bytes // (4 * vocab * 8))


@torch.no_grad()
def matrices(rt: ModelRuntime, items: list[Staged], reading: Reading, *, chunk_bytes: int) -> list[KLMatrix]:
    """One KLMatrix per staged item. Where `unembed.applies`, one vocabulary-chunked head pass
    serves every item at once; otherwise each item goes through the row-chunked path
    (`cells_rows`)."""
    k = min(reading.topk, items[0].trace.ref_logp.shape[-1]) if items else 0
    if unembed.applies(rt.adapter, reading.divergences):
        cells = cells_fused(rt, items, k, chunk_bytes=chunk_bytes)
    else:
        cells = [cells_rows(rt, item, reading.divergences, k, chunk_bytes=chunk_bytes) for item in items]
    return [matrix(rt, item, reading, numbers) for item, numbers in zip(items, cells)]


def cells_fused(rt: ModelRuntime, items: list[Staged], k: int, *, chunk_bytes: int) -> list[CellValues]:
    """`unembed.run` over the items' cells, in passes of at most chunk_bytes of logits."""
    budget = max(1, chunk_bytes // unembed.cell_bytes())
    pieces = []  # (item index, HeadJob), each at most `budget` cells (one row if a row is more)
    for i, item in enumerate(items):
        trace, hidden = item.trace, item.hidden
        gen_ids = torch.tensor(trace.generation.token_ids, device=trace.ref_logp.device)
        step = max(1, budget // max(1, hidden.shape[1]))
        pieces += [
            (i, unembed.HeadJob(hidden[r : r + step], trace.reference, trace.ref_logp, gen_ids))
            for r in range(0, hidden.shape[0], step)
        ]
    parts: list[list] = [[] for _ in items]
    group: list[tuple[int, unembed.HeadJob]] = []
    size = 0
    for piece in pieces + [None]:
        cells = 0 if piece is None else piece[1].hidden.shape[0] * piece[1].hidden.shape[1]
        if group and (piece is None or size + cells > budget):
            for (i, _), out in zip(group, unembed.run(rt.adapter, [job for _, job in group], k)):
                parts[i].append(out)
            group, size = [], 0
        if piece is not None:
            group.append(piece)
            size += cells
    result = []
    for item, outs in zip(items, parts):

        def cat(name, outs=outs):
            return torch.cat([getattr(o, name) for o in outs]).numpy()

        kl = cat("kl")
        if not np.isfinite(kl).all():  # -inf logits (P = Q = 0 there), or a non-finite state: the
            result.append(cells_rows(rt, item, ("kl",), k, chunk_bytes=chunk_bytes))  # row path decides,
            continue  # as kl_rows does
        result.append(
            CellValues(
                values={"kl": kl},
                gen_logq=cat("gen_logq"),
                gen_rank=cat("gen_rank"),
                topk_ids=cat("topk_ids") if k else None,
                topk_probs=cat("topk_probs") if k else None,
                gen_logp=outs[0].gen_logp.numpy(),
                q_entropy=None if outs[0].q_entropy is None else cat("q_entropy"),
                gen_entropy=None if outs[0].gen_entropy is None else outs[0].gen_entropy.numpy(),
            )
        )
    return result


def cells_rows(rt: ModelRuntime, item: Staged, divergences: tuple[str, ...], k: int, *, chunk_bytes: int) -> CellValues:
    """The numbers of one item's cells through full-vocabulary log Q, a bounded number of
    cells at a time (`cells_per_chunk`): every divergence, any head."""
    trace, hidden = item.trace, item.hidden
    gen = trace.generation
    gen_ids = torch.tensor(gen.token_ids, device=trace.ref_logp.device)  # P and Q meet on the head's device
    n_rows = hidden.shape[0]
    values = {d: np.full((n_rows, gen.n), np.nan, dtype=np.float32) for d in divergences}
    topk_ids = np.zeros((n_rows, gen.n, k), dtype=np.int32) if k else None
    topk_probs = np.zeros((n_rows, gen.n, k), dtype=np.float32) if k else None
    gen_rank = np.zeros((n_rows, gen.n), dtype=np.int32)
    gen_logq = np.zeros((n_rows, gen.n), dtype=np.float32)
    q_entropy = np.zeros((n_rows, gen.n), dtype=np.float32)
    cells = cells_per_chunk(trace.ref_logp.shape[-1], chunk_bytes)
    ref_p = trace.ref_logp.exp() if "kl" in divergences else None  # P, once per prompt (float32+)
    rows_per = max(1, cells // gen.n)
    for r0 in range(0, n_rows, rows_per):
        rows = slice(r0, min(r0 + rows_per, n_rows))
        step = max(1, cells // (rows.stop - rows.start))  # positions per piece, so log Q stays in budget
        for p0 in range(0, gen.n, step):
            cols = slice(p0, min(p0 + step, gen.n))
            logq = rt.adapter.log_probs(hidden[rows, cols])  # (R, m, V)
            result = divergence.compute_rows(
                divergences, trace.ref_logp[cols], logq, None if ref_p is None else ref_p[cols]
            )
            for name, tensor in result.items():
                values[name][rows, cols] = tensor.float().cpu().numpy()
            target = logq.gather(-1, gen_ids[cols].expand(logq.shape[0], -1).unsqueeze(-1))  # (R, m, 1)
            gen_logq[rows, cols] = target[..., 0].float().cpu().numpy()
            q_entropy[rows, cols] = entropy(logq).float().cpu().numpy()
            # rank = 1 + #{v: Q(v) > Q(Gen t)}; an int32 sum of the comparison is 3x faster than bool.sum
            gen_rank[rows, cols] = (1 + torch.gt(logq, target).sum(-1, dtype=torch.int32)).cpu().numpy()
            if topk_ids is not None and topk_probs is not None:  # k > 0
                best = logq.topk(k, dim=-1)  # sorted: rank 1 first
                topk_ids[rows, cols] = best.indices.cpu().numpy()
                topk_probs[rows, cols] = best.values.exp().float().cpu().numpy()
            del logq, result, target
    return CellValues(
        values=values,
        gen_logq=gen_logq,
        gen_rank=gen_rank,
        topk_ids=topk_ids,
        topk_probs=topk_probs,
        q_entropy=q_entropy,
    )


def matrix(rt: ModelRuntime, item: Staged, reading: Reading, numbers: CellValues) -> KLMatrix:
    """The KLMatrix of one item's cell numbers: P's own numbers per Gen t (from the fused
    pass where it computed them, else from the trace), and every non-finite cell named in
    `errors` and stored as NaN."""
    trace, spec, layers, lens = item.trace, reading.probe, reading.layers, reading.lens
    gen = trace.generation
    ref = trace.ref_logp
    gen_ids = torch.tensor(gen.token_ids, device=ref.device)
    logprob = numbers.gen_logp  # the fused pass's own log P(Gen t) (unembed.HeadCells.gen_logp)
    if logprob is None:
        logprob = ref[torch.arange(gen.n, device=ref.device), gen_ids].float().cpu().numpy()
    gen_entropy = numbers.gen_entropy  # the fused pass's own H(P), as gen_logp
    if gen_entropy is None:
        gen_entropy = entropy(ref).float().cpu().numpy()
    values = numbers.values
    errors = []
    for name, cells in values.items():
        bad = np.argwhere(~np.isfinite(cells))
        for row, col in bad:
            errors.append(f"non-finite {name} at layer {layers[row]}, Gen{col}")
            cells[row, col] = np.nan
    return KLMatrix(
        model=rt.label,
        prompt=item.prompt,
        probe=lens.readout if spec.is_readout else spec.name,
        probe_params=dict(spec.params),
        layers=tuple(layers),
        n_layers_total=rt.n_layers,
        generation=gen,
        values=values,
        top1_match=numbers.gen_rank == 1,  # = (argmax Q == Gen t) but for exact ties
        gen_logprob=logprob.astype(np.float32),
        gen_entropy=gen_entropy.astype(np.float32),
        errors=tuple(errors),
        topk_ids=numbers.topk_ids,
        topk_probs=numbers.topk_probs,
        gen_rank=numbers.gen_rank,
        gen_logq=numbers.gen_logq,
        q_entropy=numbers.q_entropy,
        lens=lens.kind if spec.is_readout else "logit",
        lens_id=lens.id if spec.is_readout else LOGIT_LENS.id,
    )
