"""Divergences between next-token distributions, defined once for all of klstore.

All functions take log-probabilities (from log_softmax) whose last dimension is
the vocabulary and return one value per leading index, in nats. Inputs are
upcast to at least float32.

    kl(logp, logq)          = KL(P || Q) = sum_v P(v) (log P(v) - log Q(v))   (forward KL)
    kl_reverse(logp, logq)  = KL(Q || P)
    js(logp, logq)          = (KL(P || M) + KL(Q || M)) / 2,  M = (P + Q) / 2,  0 <= js <= ln 2

KL values are clamped at 0 from below (rounding leaves e.g. -2e-8 where P = Q).
Terms with P(v) = 0 contribute 0 (the limit of p log p); Q(v) = 0 where
P(v) > 0 gives +inf, which callers treat as an error, never as a number.
"""

from __future__ import annotations

import math

import torch

from klstore.spec import DIVERGENCES


def _wide(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last dimension. (..., V), (..., V) -> (...)."""
    logp, logq = _wide(logp), _wide(logq)
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros((), dtype=p.dtype, device=p.device))
    # KL >= 0; rounding can leave values like -1e-8, which are clamped to 0.
    return terms.sum(-1).clamp_min(0.0)


def kl_reverse(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(Q || P) over the last dimension. (..., V), (..., V) -> (...)."""
    return kl(logq, logp)


def js(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence over the last dimension, in [0, ln 2]. (..., V) -> (...)."""
    logp, logq = _wide(logp), _wide(logq)
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    value = 0.5 * (kl(logp, logm) + kl(logq, logm))
    return value.clamp(0.0, math.log(2.0))


def kl_rows(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) for many Q per P: sum_v P (log P - log Q) as one subtraction and blocked dot
    products (`_blocked_dot`), instead of `kl`'s three vocabulary-sized temporaries.

    p, logp: (m, V) P and log P; logq: (R, m, V). Returns (R, m), clamped at 0; P = Q gives
    exactly 0. Where log P and log Q are both -inf the difference is NaN; those cells are
    recomputed with `kl` (the term is 0 there; log Q = -inf where P > 0 gives +inf)."""
    logq = _wide(logq)
    value = -_blocked_dot(p.to(logq.dtype), logq - logp.to(logq.dtype))
    bad = ~torch.isfinite(value)
    if bad.any():
        rows, cols = bad.nonzero(as_tuple=True)
        value[rows, cols] = kl(logp[cols].to(logq.dtype), logq[rows, cols])
    return value.clamp_min(0.0)


DOT_BLOCK = 256  # vocabulary entries per BLAS dot; the partial sums are then added pairwise


def _blocked_dot(p: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_v p[m, v] * logq[r, m, v] -> (R, m). One BLAS dot over a 262k vocabulary in float32
    accumulates sequentially (errors of 7e-4 nats seen on KL of ~40); dots over blocks of
    DOT_BLOCK entries, summed pairwise by torch, keep the error at the elementwise sum's (1e-5)."""
    vocab = p.shape[-1]
    whole = vocab - vocab % DOT_BLOCK
    m, r = p.shape[0], logq.shape[0]
    total = torch.einsum(
        "mcv,rmcv->rmc", p[:, :whole].reshape(m, -1, DOT_BLOCK), logq[..., :whole].reshape(r, m, -1, DOT_BLOCK)
    ).sum(-1)
    if whole < vocab:
        total = total + torch.einsum("mv,rmv->rm", p[:, whole:], logq[..., whole:])
    return total


_FUNCTIONS = {"kl": kl, "kl_reverse": kl_reverse, "js": js}
if set(_FUNCTIONS) != set(DIVERGENCES):  # the names live in klstore.spec, the math here
    raise ImportError(f"klstore.spec.DIVERGENCES {sorted(DIVERGENCES)} != functions {sorted(_FUNCTIONS)}")


def compute(names: tuple[str, ...], logp: torch.Tensor, logq: torch.Tensor) -> dict[str, torch.Tensor]:
    """The named divergences between P (reference) and Q (probe), each of shape logp.shape[:-1]."""
    return {name: _FUNCTIONS[name](logp, logq) for name in names}


def compute_rows(
    names: tuple[str, ...], logp: torch.Tensor, logq: torch.Tensor, p: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """`compute` for logp (m, V) against logq (R, m, V): forward KL through `kl_rows` (pass
    `p = logp.exp()` to reuse it across calls), the others as in `compute`. Agrees with
    `compute` to float32 rounding (tests/unit/test_divergence.py)."""
    out = {}
    for name in names:
        if name == "kl":
            out[name] = kl_rows(_wide(logp).exp() if p is None else p, logp, logq)
        else:
            out[name] = _FUNCTIONS[name](logp.unsqueeze(0), logq)
    return out
