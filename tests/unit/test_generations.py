"""The `generations` and `prompts` views against an independent float64 computation.

A worker writes one shard (several prompts of different lengths, so generation and
the clean trace run left-padded) of a tiny random model into a store. Then, per prompt,
one plain float64 forward over prompt + generated tokens gives log P_t (conventions
§3: the clean model's distribution at the position that predicts Gen t), and from it
log P_t(Gen t), the entropy of P_t in nats, and the greedy choice.
"""

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, ToyTokenizer, build

from klstore.core.models import from_objects
from klstore.run.worker import Worker
from klstore.spec import ComputeSpec, GenerationSpec, ProbeSpec, Prompt
from klstore.store import views

MAX_NEW = 6
PROMPTS = [
    Prompt("short", "Hi", "a"),
    Prompt("fox", "The quick brown fox", "a"),
    Prompt("vow", "Sphinx of black quartz, judge my vow", "b"),
]
JOB = ComputeSpec((ProbeSpec("logit_lens"),), "all", ("kl",), GenerationSpec(max_new_tokens=MAX_NEW))
EOS = ToyTokenizer.eos_token_id
NEAR_TIE = 1e-3  # nats between the two most likely tokens: float32 may pick either


@pytest.fixture(scope="module", params=FAMILIES)
def stored(request, tmp_path_factory):
    """(family, store uri) after one shard of PROMPTS was computed and written."""
    family = request.param
    uri = str(tmp_path_factory.mktemp("store") / "store")
    loaded = from_objects("tiny", build(family), ToyTokenizer())
    Worker("tiny", "tiny", uri, loaded=loaded).run_shard("r1", PROMPTS, JOB)
    return family, uri


@torch.no_grad()
def _float64_log_probs(model64, prompt_ids, token_ids):
    """log P_t for t = 0..n-1, float64: (n, V), from one plain forward of the float64 model."""
    sequence = torch.tensor([list(prompt_ids) + list(token_ids)])
    logits = model64(sequence).logits[0].double()
    first = len(prompt_ids) - 1
    return logits[first : first + len(token_ids)].log_softmax(-1)


def _rows(uri, query, prompt_id):
    _, rows = views.sql(uri, query, [prompt_id])
    return rows


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: p.id)
def test_generations_match_float64(stored, prompt):
    family, uri = stored
    gens = _rows(
        uri,
        "SELECT gen_idx, token_id, token_text, logprob, entropy, prompt_group, model, "
        "run_id FROM generations WHERE prompt_id = ? ORDER BY gen_idx",
        prompt.id,
    )
    (info,) = _rows(
        uri, "SELECT n_prompt_tokens, n_generated, status, stopped_at_eos FROM prompts WHERE prompt_id = ?", prompt.id
    )
    prompt_ids = ToyTokenizer()(prompt.text)["input_ids"]
    tokens = [r[1] for r in gens]
    assert info[0] == len(prompt_ids)
    assert info[1] == len(gens) and info[2] == "ok"
    assert [r[0] for r in gens] == list(range(len(gens)))
    assert {r[5:] for r in gens} == {(prompt.group, "tiny", "r1")}
    assert [r[2] for r in gens] == [ToyTokenizer().decode([t]) for t in tokens]
    # up to MAX_NEW tokens, fewer only when the last one is EOS (kept, nothing padded)
    assert 1 <= len(tokens) <= MAX_NEW and EOS not in tokens[:-1]
    assert info[3] == (tokens[-1] == EOS)
    assert len(tokens) == MAX_NEW or tokens[-1] == EOS

    logp = _float64_log_probs(build(family, torch.float64), prompt_ids, tokens)  # (n, V)
    expected_logprob = logp[torch.arange(len(tokens)), torch.tensor(tokens)].numpy()
    expected_entropy = -(logp.exp() * logp).sum(-1).numpy()
    np.testing.assert_allclose([r[3] for r in gens], expected_logprob, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose([r[4] for r in gens], expected_entropy, rtol=1e-4, atol=1e-4)
    assert (expected_entropy > 0.1).all()  # spread-out distributions: the check is not vacuous

    # greedy: every token is the float64 argmax, except at near ties (skipped)
    top2 = logp.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1] > NEAR_TIE).numpy()
    assert clear.sum() >= 1, "every position was a near tie: nothing was checked"
    np.testing.assert_array_equal(np.array(tokens)[clear], logp.argmax(-1).numpy()[clear])


def test_every_prompt_is_stored_once(stored):
    _, uri = stored
    _, prompts = views.sql(uri, "SELECT prompt_id, count(*) FROM prompts GROUP BY prompt_id ORDER BY 1")
    assert prompts == sorted((p.id, 1) for p in PROMPTS)
    _, total = views.sql(uri, "SELECT (SELECT sum(n_generated) FROM prompts), (SELECT count(*) FROM generations)")
    assert total[0][0] == total[0][1] > 0


def _eos_forced(dtype=torch.float32):
    """The tiny Llama with a head that favours EOS (id 0): it stops within a few tokens."""
    model = build("llama", dtype)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[EOS].fill_(1.0)
        model.model.norm.weight.fill_(1.0)
    return model


def test_stop_at_eos_is_recorded_not_padded(tmp_path):
    uri = str(tmp_path / "store")
    prompt = PROMPTS[1]
    loaded = from_objects("tiny", _eos_forced(), ToyTokenizer())
    Worker("tiny", "tiny", uri, loaded=loaded).run_shard("r1", [prompt], JOB)
    gens = _rows(
        uri,
        "SELECT gen_idx, token_id, logprob, entropy FROM generations WHERE prompt_id = ? ORDER BY gen_idx",
        prompt.id,
    )
    tokens = [r[1] for r in gens]
    assert len(tokens) < MAX_NEW and tokens[-1] == EOS and EOS not in tokens[:-1]
    assert [r[0] for r in gens] == list(range(len(tokens)))
    assert _rows(uri, "SELECT n_generated, stopped_at_eos, status FROM prompts WHERE prompt_id = ?", prompt.id) == [
        (len(tokens), True, "ok")
    ]
    logp = _float64_log_probs(_eos_forced(torch.float64), ToyTokenizer()(prompt.text)["input_ids"], tokens)
    np.testing.assert_allclose(
        [r[2] for r in gens], logp[torch.arange(len(tokens)), tokens].numpy(), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose([r[3] for r in gens], -(logp.exp() * logp).sum(-1).numpy(), rtol=1e-4, atol=1e-4)
