"""The unembedding pass: final residual states -> each cell's stored numbers, one vocabulary
chunk at a time (docs/conventions.md defines the numbers; docs/architecture.md, "Speed").

A cell is (probe row, position t). For the forward KL, the lens tokens, the rank and the
entropy of Q, a cell needs only a few numbers from its V logits z_q: log-sum-exp, the
generated token's logit, how many logits exceed it, the top k, sum_v P(v) (z_p(v) - z_q(v)),
and the running moment sum_v exp(z_q(v) - m) (z_q(v) - m) about the running max m, from which
H(Q) = log sum_v exp(z_q(v) - m) - moment / sum_v exp(z_q(v) - m). So the head's
matmul runs over all cells of many prompts at once (a large GEMM), `VOCAB_CHUNK` vocabulary
rows at a time, and each chunk's logits are reduced while they are still in cache; no
(cells x V) tensor is ever built. The reference states (the last block's output at the
positions predicting Gen t) ride along as extra rows of the same GEMM, so P's logits z_p
come from the very same kernel call:

    KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)) = sum_v P(v) (z_p(v) - z_q(v)) + (lse_q - lse_p) sum_v P(v)

which is exactly 0 where Q's state equals P's (the logit lens's last layer: identical rows
give identical logits and log-sum-exps). The sum over v is taken in blocks of
`divergence.DOT_BLOCK` entries, added pairwise, as `divergence.kl_rows` does.

Only the plain case goes this way (`applies`): the forward KL alone (`kl_reverse` and `js`
need every Q(v)) and a head that is a bare `nn.Linear` (no accelerate hook: a split or
offloaded model keeps the engine's row-chunked path). Agreement with that path is tested
to 1e-5 (tests/unit/test_unembed.py); both are tested against float64 (tests/reference.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from klstore.core.adapter import Adapter
from klstore.core.divergence import DOT_BLOCK

VOCAB_CHUNK = 4096  # vocabulary rows per GEMM: a (cells x 4096) float32 block stays near the cache


@dataclass
class HeadJob:
    """One (prompt, probe) matrix's cells for the head pass: R probe rows x m positions."""

    hidden: torch.Tensor  # (R, m, H) residual states, before the final norm
    reference: torch.Tensor  # (m, H) the last block's clean output at the same positions
    ref_logp: torch.Tensor  # (m, V) log P (float32+), from the clean trace
    gen_ids: torch.Tensor  # (m,) long: Gen t


@dataclass
class HeadCells:
    """A job's numbers, each (R, m) unless stated; float32 / int32 on the CPU."""

    kl: torch.Tensor
    gen_logq: torch.Tensor  # log Q(Gen t)
    gen_rank: torch.Tensor  # 1 + #{v: Q(v) > Q(Gen t)}
    topk_ids: torch.Tensor | None  # (R, m, k) by rank; None when k = 0
    topk_probs: torch.Tensor | None  # (R, m, k) Q of those tokens
    gen_logp: torch.Tensor  # (m,) log P(Gen t) from the same GEMM: the logit lens's last
    #                         layer reproduces it bit for bit
    q_entropy: torch.Tensor | None = None  # H(Q), nats; None when run(entropy=False)
    gen_entropy: torch.Tensor | None = None  # (m,) H(P) from the same GEMM (the last layer's H(Q))


def applies(adapter: Adapter, divergences: tuple[str, ...]) -> bool:
    """Whether this pass can serve a run: forward KL only, and a bare linear head."""
    head = adapter.head
    return (
        tuple(divergences) == ("kl",)
        and type(head) is nn.Linear
        and not head._forward_hooks
        and not head._forward_pre_hooks
        and getattr(head, "_hf_hook", None) is None
        and head.weight.device.type != "meta"
    )


def cell_bytes(chunk: int = VOCAB_CHUNK) -> int:
    """Memory per cell in flight: its float32 logits chunk, the entropy's two scratch rows, and
    about three same-sized temporaries (the comparison, z_p - z_q, a widening copy), with room
    for the reference rows."""
    return 6 * 4 * chunk


@torch.no_grad()
def run(
    adapter: Adapter, jobs: list[HeadJob], k: int, chunk: int | None = None, entropy: bool = True
) -> list[HeadCells]:
    """Every job's cells in one pass over the vocabulary (see the module docstring);
    `chunk` vocabulary rows per GEMM (default VOCAB_CHUNK). `entropy=False` skips H(Q) (only
    benchmarks/entropy_cost.py does, to measure what it costs)."""
    chunk = chunk or VOCAB_CHUNK
    head = adapter.head
    weight: torch.Tensor = head.weight  # type: ignore[assignment]  # nn.Module attributes are untyped
    bias: torch.Tensor | None = head.bias  # type: ignore[assignment]
    device = weight.device
    wide = torch.float64 if any(job.hidden.dtype == torch.float64 for job in jobs) else torch.float32
    sizes = [job.hidden.shape[0] * job.hidden.shape[1] for job in jobs]
    states = torch.cat(
        [job.hidden.reshape(-1, job.hidden.shape[-1]).to(device) for job in jobs]
        + [job.reference.to(device) for job in jobs]
    )
    x = adapter.final_norm(states)
    cells = sum(sizes)
    ref_start = [cells + sum(job.reference.shape[0] for job in jobs[:j]) for j in range(len(jobs))]
    starts = [sum(sizes[:j]) for j in range(len(jobs))]
    gen = torch.cat(
        [job.gen_ids.to(device).repeat(job.hidden.shape[0]) for job in jobs] + [job.gen_ids.to(device) for job in jobs]
    )  # (cells + references,)

    def transform(z: torch.Tensor) -> torch.Tensor:  # = Adapter.logits after the head
        z = z.to(wide)
        if adapter.scale != 1.0:
            z = z * adapter.scale
        if adapter.softcap is not None:
            z = torch.tanh(z / adapter.softcap) * adapter.softcap
        return z

    # Gen t's logit, from a small GEMM of each job's states against its Gen t rows (the same
    # dtype and matmul precision as the chunks', so bfloat16 logits round alike), counts the
    # logits above it in the chunks before its own; from its own chunk on, the chunk GEMM's
    # value (`exact`) does, so Gen t never counts itself and the stored log Q(Gen t) is the GEMM's.
    approx = torch.cat(
        [
            _own_logits(x[starts[j] : starts[j] + sizes[j]], job.gen_ids.to(device), weight, bias)
            for j, job in enumerate(jobs)
        ]
        + [
            _own_logits(x[ref_start[j] : ref_start[j] + job.reference.shape[0]], job.gen_ids.to(device), weight, bias)
            for j, job in enumerate(jobs)
        ]
    )
    approx = transform(approx)
    exact = approx.clone()
    mass_p = [torch.zeros(job.reference.shape[0], dtype=wide, device=device) for job in jobs]  # sum_v P(v)
    total = x.shape[0]
    top = torch.full((total, 0), -torch.inf, dtype=wide, device=device)
    top_ids = torch.zeros((total, 0), dtype=torch.long, device=device)
    high = torch.full((total,), -torch.inf, dtype=wide, device=device)  # running max
    mass = torch.zeros(total, dtype=wide, device=device)  # running sum of exp(z - high)
    moment = torch.zeros(total, dtype=wide, device=device)  # running sum of exp(z - high) (z - high)
    scratch = torch.empty((2, total, min(chunk, int(weight.shape[0]))), dtype=wide, device=device) if entropy else None
    above = torch.zeros(total, dtype=torch.int32, device=device)
    partial: list[list[torch.Tensor]] = [[] for _ in jobs]  # per job: (R, m, blocks) partial sums of P (z_p - z_q)
    rows = torch.arange(total, device=device)
    vocab = int(weight.shape[0])
    for v0 in range(0, vocab, chunk):
        width = min(chunk, vocab - v0)
        z = transform(
            nn.functional.linear(x, weight[v0 : v0 + width], None if bias is None else bias[v0 : v0 + width])
        )  # (total, c)
        # (torch.logsumexp is no faster here, and its result for a row depends on the row's
        # place in the batch, which would break the exact 0 of identical rows)
        peak = torch.maximum(high, z.amax(-1))
        shift = high - peak  # <= 0; -inf before the first chunk, where mass and moment are 0
        scale = shift.exp()
        if scratch is not None:
            # sum_v e (z - peak) = scale (moment + shift mass) over the chunks so far, then this
            # chunk's terms, in two scratch blocks kept for the whole pass (a fresh (cells x chunk)
            # tensor per chunk costs more in page faults than the arithmetic does)
            moment = torch.where(mass > 0, scale * (moment + shift * mass), 0.0)
            centred = torch.sub(z, peak[:, None], out=scratch[0][:, :width])
            weights = torch.exp(centred, out=scratch[1][:, :width])
            mass = mass * scale + weights.sum(-1)
            # a logit of -inf gives 0 x -inf = NaN: its term is 0 (the limit), hence nansum
            moment = moment + centred.mul_(weights).nansum(-1)
        else:
            mass = mass * scale + (z - peak[:, None]).exp_().sum(-1)
        high = peak
        inside = (gen >= v0) & (gen < v0 + width)
        if inside.any():
            here = rows[inside]
            exact[here] = z[here, gen[here] - v0]
        target = torch.where(gen >= v0 + width, approx, exact)
        above += torch.gt(z, target[:, None]).sum(-1, dtype=torch.int32)
        for j, job in enumerate(jobs):
            r, m = job.hidden.shape[:2]
            zq = z[starts[j] : starts[j] + sizes[j]].view(r, m, width)
            gap = z[ref_start[j] : ref_start[j] + m] - zq  # (R, m, c): z_p - z_q
            p = job.ref_logp[:, v0 : v0 + width].to(device, wide).exp()  # P, a chunk at a time
            mass_p[j] += p.sum(-1)
            partial[j].append(_blocked(p, gap))
        if k:
            best = z.topk(min(k, width), dim=-1)
            top, order = torch.cat([top, best.values], -1).topk(min(k, top.shape[1] + width), dim=-1)
            top_ids = torch.cat([top_ids, best.indices + v0], -1).gather(-1, order)
        del z
    lse = high + mass.log()
    q_entropy = (mass.log() - moment / mass).clamp_min(0.0) if entropy else None  # H >= 0; rounding
    out = []
    for j, job in enumerate(jobs):
        r, m = job.hidden.shape[:2]
        own = slice(starts[j], starts[j] + sizes[j])
        lse_q = lse[own].view(r, m)
        lse_p = lse[ref_start[j] : ref_start[j] + m]
        kl = torch.cat(partial[j], -1).sum(-1) + (lse_q - lse_p) * mass_p[j]
        out.append(
            HeadCells(
                kl=kl.clamp_min(0.0).float().cpu(),
                gen_logq=(exact[own].view(r, m) - lse_q).float().cpu(),
                gen_rank=(1 + above[own]).view(r, m).cpu(),
                topk_ids=top_ids[own].view(r, m, -1).int().cpu() if k else None,
                topk_probs=(top[own] - lse[own, None]).exp().view(r, m, -1).float().cpu() if k else None,
                gen_logp=(exact[ref_start[j] : ref_start[j] + m] - lse_p).float().cpu(),
                q_entropy=None if q_entropy is None else q_entropy[own].view(r, m).float().cpu(),
                gen_entropy=None if q_entropy is None else q_entropy[ref_start[j] : ref_start[j] + m].float().cpu(),
            )
        )
    return out


def _own_logits(x: torch.Tensor, gen_ids: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """Row i of x (cells ordered (row, position), m positions) against Gen t's head row, t = i mod m."""
    m = gen_ids.shape[0]
    z = nn.functional.linear(x, weight[gen_ids], None if bias is None else bias[gen_ids])  # (cells, m)
    return z.view(-1, m, m).diagonal(dim1=1, dim2=2).reshape(-1)


def _blocked(p: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """sum over blocks of DOT_BLOCK entries of p[m, v] * gap[r, m, v] -> (R, m, blocks).
    (A product and a sum over the last axis: einsum would permute gap into a copy for bmm.)"""
    m, width = p.shape
    r = gap.shape[0]
    whole = width - width % DOT_BLOCK
    terms = gap.mul_(p)
    sums = terms[..., :whole].reshape(r, m, -1, DOT_BLOCK).sum(-1)
    if whole < width:
        sums = torch.cat([sums, terms[..., whole:].sum(-1, keepdim=True)], -1)
    return sums
