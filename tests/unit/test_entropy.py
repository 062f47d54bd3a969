"""The entropy of each layer's read-out (kl rows' `q_entropy`; docs/conventions.md, "Entropy of
Q") against the float64 reference, on the fused unembedding pass and the row-chunked path."""

import numpy as np
import pytest
import torch
from reference import reference_matrices
from tiny_models import build

from klstore.spec import GenerationSpec, ProbeSpec, Prompt

PROMPT = Prompt("p1", "The quick brown fox", group="g")


# ("kl",) takes the fused pass (core/unembed.py); adding js takes the row path
@pytest.mark.parametrize("divergences", [("kl",), ("kl", "js")], ids=["fused", "rows"])
@pytest.mark.parametrize("probe", ["logit_lens", "skip"])
def test_q_entropy_matches_float64_reference(family, engine, probe, divergences):
    result = engine.run(PROMPT, [ProbeSpec(probe)], "all", divergences, GenerationSpec(max_new_tokens=4))[0]
    gen = result.generation
    sequence = list(gen.prompt_ids) + list(gen.token_ids[:-1])
    *_, logq64 = reference_matrices(
        build(family, torch.float64), sequence, len(gen.prompt_ids), gen.n, probe, result.layers, return_logq=True
    )
    expected = -(logq64.exp() * logq64).nan_to_num().sum(-1).numpy()  # (layers, n) float64
    assert result.q_entropy.dtype == np.float32 and result.q_entropy.shape == expected.shape
    # float32 logits over a 96-token vocabulary: entropies of ~4 nats to about 1e-6 relative
    np.testing.assert_allclose(result.q_entropy, expected, rtol=2e-5, atol=2e-6)
    assert (result.q_entropy >= 0).all() and (result.q_entropy <= np.log(logq64.shape[-1]) + 1e-5).all()


@pytest.mark.parametrize("divergences", [("kl",), ("kl", "js")], ids=["fused", "rows"])
def test_last_layer_logit_lens_entropy_is_the_outputs(engine, divergences):
    """Q = P at the last block: the stored H(Q) there is the generations table's entropy, bit
    for bit (both come from the same logits and the same arithmetic)."""
    result = engine.run(PROMPT, [ProbeSpec("logit_lens")], "all", divergences, GenerationSpec(max_new_tokens=4))[0]
    np.testing.assert_array_equal(result.q_entropy[-1], result.gen_entropy)


def test_streaming_entropy_handles_masked_logits_and_chunk_boundaries():
    """H from the fused pass's running moment equals the closed form when some logits are -inf
    (p = 0 terms are 0, not NaN) and the maximum moves between vocabulary chunks."""
    from klstore.core import unembed
    from klstore.core.adapter import Adapter

    model = build("llama").requires_grad_(False)
    old = model.lm_head
    model.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True).requires_grad_(False)
    with torch.no_grad():
        model.lm_head.weight.copy_(old.weight)
        model.lm_head.weight[40:] *= 3.0  # the running max moves in a later chunk
        model.lm_head.bias.zero_()
        model.lm_head.bias[[7, 50]] = -torch.inf  # masked tokens: Q = 0 there
    adapter = Adapter.discover(model)
    hidden = torch.randn(3, 2, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    reference = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    ref_logp = adapter.log_probs(reference).float()
    job = unembed.HeadJob(hidden, reference, ref_logp, torch.tensor([3, 9]))
    for chunk in (16, 17, 4096):
        (cells,) = unembed.run(adapter, [job], k=2, chunk=chunk)
        logq = adapter.log_probs(hidden).double()
        assert torch.isinf(logq[..., 7]).all()
        expected = -(logq.exp() * logq).nan_to_num().sum(-1)
        torch.testing.assert_close(cells.q_entropy.double(), expected, rtol=2e-5, atol=2e-6)
        without = unembed.run(adapter, [job], k=2, chunk=chunk, entropy=False)[0]
        assert without.q_entropy is None  # and H changes no other number:
        torch.testing.assert_close(without.kl, cells.kl, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(without.gen_logq, cells.gen_logq) and torch.equal(without.topk_probs, cells.topk_probs)


def test_result_and_json_expose_q_entropy():
    from tiny_models import ToyTokenizer

    import klstore
    from klstore.output import results_to_json

    res = klstore.load(model=build("llama"), tokenizer=ToyTokenizer(), label="tiny").compute(
        ["The quick brown fox"], probes=["logit_lens", "skip"], n=3
    )
    for probe in ("logit_lens", "skip"):
        got = res.entropy(0, probe)
        assert got.shape == (len(res.layers), 3) and np.isfinite(got).all()
        np.testing.assert_array_equal(got, res.klmatrix(0, probe).q_entropy)
    np.testing.assert_array_equal(res.entropy(0)[-1], [t["entropy"] for t in res.tokens(0)])
    document = results_to_json("tiny", res.results)
    probes = document["prompts"][0]["probes"]
    assert [p["probe"] for p in probes] == ["logit_lens", "skip"]
    np.testing.assert_array_equal(np.asarray(probes[1]["q_entropy"], np.float32), res.entropy(0, "skip"))
