"""Lens tokens (top-k of Q, the generated token's rank and log Q) against the float64 reference."""

import numpy as np
import pytest
import torch

from klstore.spec import GenerationSpec, ProbeSpec, Prompt
from reference import reference_matrices
from tiny_models import build

PROMPT = Prompt("p1", "The quick brown fox", group="g")
TIE = 1e-4  # log-prob gap under which float32 may order two tokens either way


def check_lens_tokens(result, logq64: torch.Tensor, k: int) -> int:
    """Assert `result`'s lens tokens equal the float64 log Q (cells x vocab); returns how many
    rank/id comparisons were made (ties within TIE excepted)."""
    gen_ids = torch.tensor(result.generation.token_ids)
    q64 = logq64.exp()
    compared = 0
    # probabilities of the top-k tokens, in rank order, equal the reference's k largest
    expected = q64.topk(k, dim=-1).values.numpy()
    np.testing.assert_allclose(result.topk_probs, expected, atol=1e-5, rtol=1e-4)
    # ids: equal at every rank whose neighbours are not within TIE
    sorted64 = logq64.sort(dim=-1, descending=True).values[..., :k + 1]
    gaps = (sorted64[..., :-1] - sorted64[..., 1:]).numpy()  # gap to the next rank
    before = np.concatenate([np.full(gaps.shape[:-1] + (1,), np.inf), gaps[..., :-1]], axis=-1)
    clear = (gaps > TIE) & (before > TIE)
    ids64 = logq64.topk(k, dim=-1).indices.numpy()
    np.testing.assert_array_equal(result.topk_ids[clear], ids64[clear])
    compared += int(clear.sum())
    # the generated token: log Q(Gen t), and its rank = 1 + #{v: Q(v) > Q(Gen t)}
    target = logq64.gather(-1, gen_ids.expand(logq64.shape[0], -1).unsqueeze(-1))  # (L, n, 1)
    np.testing.assert_allclose(result.gen_logq, target[..., 0].numpy(), atol=1e-4, rtol=1e-4)
    rank64 = (1 + (logq64 > target).sum(-1)).numpy()
    near = ((logq64 - target).abs() < TIE).sum(-1).numpy() > 1  # another token ties with it
    np.testing.assert_array_equal(result.gen_rank[~near], rank64[~near])
    compared += int((~near).sum())
    assert (result.gen_rank >= 1).all()
    return compared


@pytest.mark.parametrize("probe", ["logit_lens", "skip"])
def test_lens_tokens_match_float64_reference(family, engine, probe):
    k = 5
    result = engine.run(PROMPT, [ProbeSpec(probe)], "all", ("kl",), GenerationSpec(max_new_tokens=4), topk=k)[0]
    gen = result.generation
    sequence = list(gen.prompt_ids) + list(gen.token_ids[:-1])
    _, top1, logq64 = reference_matrices(build(family, torch.float64), sequence, len(gen.prompt_ids), gen.n,
                                         probe, result.layers, return_logq=True)
    assert result.topk_ids.shape == (len(result.layers), gen.n, k) and result.topk_ids.dtype == np.int32
    assert check_lens_tokens(result, logq64, k) > 0
    # rank 1 is the argmax: the top1_match column agrees with the stored top-1 token
    np.testing.assert_array_equal(result.top1_match, result.topk_ids[..., 0] == np.asarray(gen.token_ids))
    np.testing.assert_array_equal(result.top1_match, result.gen_rank == 1)


def test_last_layer_logit_lens_ranks_the_greedy_token_first(engine):
    result = engine.run(PROMPT, [ProbeSpec("logit_lens")], "all", ("kl",), GenerationSpec(max_new_tokens=4))[0]
    # greedy decoding picks the model's argmax, which the last layer's logit lens reproduces
    assert (result.gen_rank[-1] == 1).all()
    np.testing.assert_array_equal(result.topk_ids[-1, :, 0], np.asarray(result.generation.token_ids))
    np.testing.assert_allclose(result.gen_logq[-1], result.gen_logprob, atol=1e-5)


def test_topk_zero_computes_no_tokens_but_keeps_rank(engine):
    result = engine.run(PROMPT, [ProbeSpec("logit_lens")], "all", ("kl",), GenerationSpec(max_new_tokens=3),
                        topk=0)[0]
    assert result.topk_ids is None and result.topk_probs is None
    assert result.gen_rank.shape == (len(result.layers), 3)
