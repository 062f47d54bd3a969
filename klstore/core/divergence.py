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


_FUNCTIONS = {"kl": kl, "kl_reverse": kl_reverse, "js": js}
if set(_FUNCTIONS) != set(DIVERGENCES):  # the names live in klstore.spec, the math here
    raise ImportError(f"klstore.spec.DIVERGENCES {sorted(DIVERGENCES)} != functions {sorted(_FUNCTIONS)}")


def compute(names: tuple[str, ...], logp: torch.Tensor, logq: torch.Tensor) -> dict[str, torch.Tensor]:
    """The named divergences between P (reference) and Q (probe), each of shape logp.shape[:-1]."""
    return {name: _FUNCTIONS[name](logp, logq) for name in names}
