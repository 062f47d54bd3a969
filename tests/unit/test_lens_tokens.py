"""Lens tokens (top-k of Q, the generated token's rank and log Q) against the float64 reference."""

import numpy as np
import pytest
import torch
from lens_checks import check_lens_tokens
from reference import reference_matrices
from tiny_models import build

from klstore.spec import GenerationSpec, ProbeSpec, Prompt

PROMPT = Prompt("p1", "The quick brown fox", group="g")


@pytest.mark.parametrize("probe", ["logit_lens", "skip"])
def test_lens_tokens_match_float64_reference(family, engine, probe):
    k = 5
    result = engine.run(PROMPT, [ProbeSpec(probe)], "all", ("kl",), GenerationSpec(max_new_tokens=4), topk=k)[0]
    gen = result.generation
    sequence = list(gen.prompt_ids) + list(gen.token_ids[:-1])
    _, top1, logq64 = reference_matrices(
        build(family, torch.float64), sequence, len(gen.prompt_ids), gen.n, probe, result.layers, return_logq=True
    )
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
    result = engine.run(PROMPT, [ProbeSpec("logit_lens")], "all", ("kl",), GenerationSpec(max_new_tokens=3), topk=0)[0]
    assert result.topk_ids is None and result.topk_probs is None
    assert result.gen_rank.shape == (len(result.layers), 3)
