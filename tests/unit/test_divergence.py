import math

import pytest
import torch

from klstore.core import divergence
from klstore.errors import KlstoreError
from klstore.spec import check_divergences


def _pairs(seed=0, shape=(7, 50), spread=3.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64) * spread
    b = torch.randn(shape, generator=g, dtype=torch.float64) * spread
    return a.log_softmax(-1), b.log_softmax(-1)


def test_kl_matches_torch_distributions():
    lp, lq = _pairs()
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=lp), torch.distributions.Categorical(logits=lq)
    )
    torch.testing.assert_close(divergence.kl(lp, lq), expected)
    torch.testing.assert_close(
        divergence.kl_reverse(lp, lq),
        torch.distributions.kl_divergence(
            torch.distributions.Categorical(logits=lq), torch.distributions.Categorical(logits=lp)
        ),
    )


def test_js_matches_definition_in_float64():
    lp, lq = _pairs(seed=1)
    p, q = lp.exp(), lq.exp()
    m = (p + q) / 2
    expected = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(divergence.js(lp, lq), expected)


def test_float32_inputs_agree_with_float64():
    lp, lq = _pairs(seed=2)
    for name in divergence.DIVERGENCES:
        wide = divergence.compute((name,), lp, lq)[name]
        narrow = divergence.compute((name,), lp.float(), lq.float())[name]
        assert narrow.dtype == torch.float32
        torch.testing.assert_close(narrow.double(), wide, atol=1e-5, rtol=1e-5)


def test_bf16_inputs_are_upcast():
    lp, lq = _pairs(seed=3)
    assert divergence.kl(lp.bfloat16(), lq.bfloat16()).dtype == torch.float32


def test_properties():
    lp, lq = _pairs(seed=4, spread=8.0)
    assert (divergence.kl(lp, lq) > 0).all()
    assert (divergence.kl_reverse(lp, lq) > 0).all()
    js = divergence.js(lp, lq)
    assert ((js >= 0) & (js <= math.log(2))).all()
    torch.testing.assert_close(divergence.kl(lp, lp), torch.zeros(7, dtype=torch.float64))
    torch.testing.assert_close(divergence.js(lp, lp), torch.zeros(7, dtype=torch.float64))
    # disjoint supports: JS reaches ln 2 exactly
    inf = float("-inf")
    a = torch.tensor([[0.0, inf]], dtype=torch.float64)
    b = torch.tensor([[inf, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(divergence.js(a, b), torch.tensor([math.log(2)], dtype=torch.float64))
    # P has zero mass where Q has mass: finite; Q zero where P has mass: infinite
    assert torch.isfinite(divergence.kl(a, torch.tensor([[-0.1, -2.4]], dtype=torch.float64))).all()
    assert torch.isinf(divergence.kl(a, b)).all()


def test_check_names():
    assert check_divergences(["js", "kl", "js"]) == ("js", "kl")
    with pytest.raises(KlstoreError, match="unknown divergence 'l2'"):
        check_divergences(["l2"])


@pytest.mark.parametrize("vocab", [7, 256, 1000, 49152])
def test_kl_rows_equals_kl_against_float64(vocab):
    """The engine's forward KL (blocked dot products, no vocabulary-sized temporary) against
    float64, including a Q that is -inf where P is 0 (recomputed elementwise) and one that is
    -inf where P is not (+inf, reported by the engine as non-finite)."""
    from klstore.core.divergence import compute_rows, kl

    g = torch.Generator().manual_seed(vocab)
    logp = (3 * torch.randn(3, vocab, generator=g)).log_softmax(-1)
    logq = (4 * torch.randn(5, 3, vocab, generator=g)).log_softmax(-1)
    logp[0, 0] = -float("inf")  # P(v) = 0 ...
    logp[0] = logp[0] - logp[0].logsumexp(-1)
    logq[1, 0, 0] = -float("inf")  # ... where Q(v) = 0: the term is 0
    logq[2, 1, 3] = -float("inf")  # Q(v) = 0 where P(v) > 0: +inf
    got = compute_rows(("kl", "js"), logp, logq)
    want = kl(logp.double().unsqueeze(0), logq.double())
    finite = torch.isfinite(want)
    assert not finite[2, 1] and got["kl"][2, 1] == float("inf")
    torch.testing.assert_close(got["kl"][finite].double(), want[finite], atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(got["js"], divergence.js(logp.unsqueeze(0), logq))
