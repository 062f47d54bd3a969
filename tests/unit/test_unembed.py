"""The vocabulary-chunked head pass (klstore/core/unembed.py) against the row-chunked path and
the float64 reference, on every tiny family, with chunks small enough that the online
log-sum-exp, the rank's two targets and the top-k merge all cross chunk borders."""

import numpy as np
import pytest
import torch
from lens_checks import check_lens_tokens
from reference import reference_matrices
from tiny_models import VOCAB, build

from klstore.core import unembed
from klstore.spec import GenerationSpec, ProbeSpec, Prompt

PROMPTS = [
    Prompt("p1", "The quick brown fox", group="g"),
    Prompt("p2", "Hello", group="g"),
    Prompt("p3", "A longer prompt than the others, by far", group="h"),
]


def _run(engine, probe, prompts=PROMPTS, n=4, topk=5):
    results = engine.run_many(prompts, [ProbeSpec(probe)], "all", ("kl",), GenerationSpec(max_new_tokens=n), topk=topk)
    for result in results:
        assert not isinstance(result, Exception), result
    return [result[0] for result in results]


@pytest.mark.parametrize("chunk, block", [(7, 3), (40, 256), (VOCAB, 256), (4096, 16)])
@pytest.mark.parametrize("probe", ["logit_lens", "skip"])
def test_chunked_pass_equals_row_path(engine, monkeypatch, probe, chunk, block):
    assert unembed.applies(engine.adapter, ("kl",))
    monkeypatch.setattr(unembed, "VOCAB_CHUNK", chunk)
    monkeypatch.setattr(unembed, "DOT_BLOCK", block)
    fused = _run(engine, probe)
    with monkeypatch.context() as m:
        m.setattr(unembed, "applies", lambda adapter, divergences: False)
        rows = _run(engine, probe)
    for a, b in zip(fused, rows):
        np.testing.assert_allclose(a.values["kl"], b.values["kl"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.gen_logq, b.gen_logq, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.topk_probs, b.topk_probs, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(a.gen_rank, b.gen_rank)  # tiny models: no ties within 1e-5
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.top1_match, b.top1_match)
        assert a.values["kl"].dtype == np.float32 and a.gen_rank.dtype == np.int32
        assert a.topk_ids.dtype == np.int32 and a.topk_probs.dtype == np.float32


@pytest.mark.parametrize("probe", ["logit_lens", "skip"])
def test_chunked_pass_matches_float64_reference(family, engine, monkeypatch, probe):
    monkeypatch.setattr(unembed, "VOCAB_CHUNK", 11)
    monkeypatch.setattr(unembed, "DOT_BLOCK", 4)
    for result in _run(engine, probe):
        gen = result.generation
        sequence = list(gen.prompt_ids) + list(gen.token_ids[:-1])
        values, _, logq64 = reference_matrices(
            build(family, torch.float64), sequence, len(gen.prompt_ids), gen.n, probe, result.layers, return_logq=True
        )
        np.testing.assert_allclose(result.values["kl"], values["kl"].numpy(), atol=1e-5, rtol=1e-5)
        assert check_lens_tokens(result, logq64, 5) > 0


def test_last_layer_logit_lens_is_exactly_zero(engine, monkeypatch):
    """Q's state equals P's there: the same GEMM rows, so the KL is 0, not a rounding residue."""
    monkeypatch.setattr(unembed, "VOCAB_CHUNK", 13)
    for result in _run(engine, "logit_lens"):
        assert (result.values["kl"][-1] == 0).all()
        assert (result.values["kl"][:-1] > 0).all()
        np.testing.assert_array_equal(result.gen_logq[-1], result.gen_logprob)  # log P from the same GEMM
        assert (result.gen_rank[-1] == 1).all()


def test_batch_equals_one_prompt_at_a_time(engine):
    together = _run(engine, "skip")
    for prompt, batched in zip(PROMPTS, together):
        alone = _run(engine, "skip", [prompt])[0]
        assert alone.generation == batched.generation
        np.testing.assert_allclose(batched.values["kl"], alone.values["kl"], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(batched.gen_rank, alone.gen_rank)


def test_small_budget_splits_passes_alike(engine):
    """chunk_bytes smaller than one row: every row of every prompt in its own pass."""
    from klstore.core.engine import Engine

    tiny = Engine(engine.loaded, chunk_bytes=1)
    for a, b in zip(_run(engine, "logit_lens"), _run(tiny, "logit_lens")):
        np.testing.assert_allclose(a.values["kl"], b.values["kl"], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)


def test_topk_zero(engine):
    result = _run(engine, "logit_lens", topk=0)[0]
    assert result.topk_ids is None and result.topk_probs is None
    assert (result.gen_rank[-1] == 1).all()


@pytest.mark.parametrize(
    "divergences, expected", [(("kl",), True), (("kl", "js"), False), (("js",), False), (("kl_reverse",), False)]
)
def test_applies_to_forward_kl_alone(engine, divergences, expected):
    assert unembed.applies(engine.adapter, divergences) is expected


def test_a_hooked_head_takes_the_row_path(engine, monkeypatch):
    """A forward hook on the head (as accelerate's offloading wraps one) must run: no fused pass."""
    calls = []
    handle = engine.adapter.head.register_forward_hook(lambda *args: calls.append(1))
    try:
        assert not unembed.applies(engine.adapter, ("kl",))
        _run(engine, "logit_lens", PROMPTS[:1])
        assert calls
    finally:
        handle.remove()


def test_non_finite_state_is_an_error_not_a_number(engine, monkeypatch):
    """A NaN residual state gives a NaN cell, which the engine reports and never stores as a number."""
    original = engine._final_states

    def poisoned(*args, **kwargs):
        hidden = original(*args, **kwargs).clone()
        hidden[1, 0] = float("nan")
        return hidden

    monkeypatch.setattr(engine, "_final_states", poisoned)
    result = _run(engine, "logit_lens", PROMPTS[:1])[0]
    kl = result.values["kl"]
    others = np.ones(kl.shape, dtype=bool)
    others[1, 0] = False
    assert np.isnan(kl[1, 0]) and np.isfinite(kl[others]).all()
    assert any("layer 1, Gen0" in error for error in result.errors)


# ------------------------------------------------------------ clean_pass: cached
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("probe", ["logit_lens", "skip"])
def test_cached_clean_pass_matches_exact_and_float64(family, engine, probe, n):
    """The trace taken from generation's own passes: the same generations, values within
    float32 rounding of the exact pass, and the float64 reference as close as the exact pass."""
    spec = GenerationSpec(max_new_tokens=n)
    exact = engine.run_many(PROMPTS, [ProbeSpec(probe)], "all", ("kl", "js"), spec)
    cached = engine.run_many(PROMPTS, [ProbeSpec(probe)], "all", ("kl", "js"), spec, clean_pass="cached")
    for a, b in zip(exact, cached):
        a, b = a[0], b[0]
        assert a.generation == b.generation and b.generation.n == n
        for name in ("kl", "js"):
            np.testing.assert_allclose(b.values[name], a.values[name], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(b.gen_logprob, a.gen_logprob, atol=1e-5)
        gen = b.generation
        sequence = list(gen.prompt_ids) + list(gen.token_ids[:-1])
        values, _ = reference_matrices(
            build(family, torch.float64), sequence, len(gen.prompt_ids), gen.n, probe, b.layers
        )
        np.testing.assert_allclose(b.values["kl"], values["kl"].numpy(), atol=1e-5, rtol=1e-5)


def test_cached_trace_equals_teacher_forced_trace(engine):
    """Block by block, position by position: the recorded outputs and P of `generate_traced`
    against `trace_batch` on the same generations (rows of different lengths, left-padded)."""
    ids = [engine.encode(p, GenerationSpec(4)) for p in PROMPTS]
    cached = engine.generate_traced(ids, GenerationSpec(4))
    exact = engine.trace_batch([t.generation for t in cached])
    for a, b in zip(cached, exact):
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.positions.tolist() == b.positions.tolist()
        assert len(a.outputs) == len(b.outputs) == engine.n_layers
        for x, y in zip(a.outputs, b.outputs):
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(a.ref_logp, b.ref_logp, atol=2e-5, rtol=1e-4)


def test_cached_trace_stops_at_eos_like_the_exact_one():
    from tiny_models import ToyTokenizer

    from klstore.core.engine import Engine
    from klstore.core.models import from_objects

    model = build("llama")
    with torch.no_grad():  # EOS (id 0) certain from the second token on: rows end at different lengths
        model.lm_head.weight[0].fill_(0.0)
    engine = Engine(from_objects("eos", model, ToyTokenizer()))
    exact = _run(engine, "logit_lens", n=6)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(engine, "trace_batch", lambda *a: pytest.fail("cached mode ran the teacher-forced pass"))
        cached = engine.run_many(
            PROMPTS, [ProbeSpec("logit_lens")], "all", ("kl",), GenerationSpec(6), clean_pass="cached"
        )
    for a, b in zip(exact, cached):
        assert a.generation == b[0].generation
        np.testing.assert_allclose(b[0].values["kl"], a.values["kl"], atol=1e-5, rtol=1e-5)


def test_unknown_clean_pass_is_refused(engine):
    from klstore.errors import KlstoreError

    with pytest.raises(KlstoreError, match="unknown clean pass 'fast': choose exact, cached"):
        engine.run_many(PROMPTS, [ProbeSpec("logit_lens")], clean_pass="fast")


# ------------------------------------------------------------ matmul_precision
@pytest.mark.parametrize("precision", ["high", "medium"])
def test_reduced_matmul_precision_is_scoped_to_the_call(family, engine, precision):
    """The precision holds during the call only (restored after, also after an error), and the
    values stay near the full-precision ones (bfloat16 products: within 2e-2 nats on these
    tiny models, whose logits reach tens)."""
    full = _run(engine, "skip")
    seen = []
    original = engine._final_states

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision))
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(engine, "_final_states", spy)
        reduced = engine.run_many(
            PROMPTS, [ProbeSpec("skip")], "all", ("kl",), GenerationSpec(max_new_tokens=4), matmul_precision=precision
        )
    assert set(seen) == {{"high": ("tf32", "ieee"), "medium": ("tf32", "bf16")}[precision]}
    assert torch.get_float32_matmul_precision() == "highest"
    for a, b in zip(full, reduced):
        assert a.generation == b[0].generation
        np.testing.assert_allclose(b[0].values["kl"], a.values["kl"], atol=2e-2, rtol=2e-2)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(engine, "trace_batch", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            engine.run_many(PROMPTS, [ProbeSpec("skip")], matmul_precision=precision)
    assert torch.get_float32_matmul_precision() == "highest"


def test_unknown_matmul_precision_is_refused(engine):
    from klstore.errors import KlstoreError

    with pytest.raises(KlstoreError, match="unknown matmul precision 'tf32': choose highest, high, medium"):
        engine.run_many(PROMPTS, [ProbeSpec("logit_lens")], matmul_precision="tf32")


def test_caller_precision_settings_survive_and_do_not_leak_in(engine):
    """A caller who set torch's per-backend precision (which makes the legacy getter raise) keeps it,
    and the default run still computes in true float32."""
    before = torch.backends.mkldnn.matmul.fp32_precision
    seen = []
    original = engine._final_states

    def spy(*args, **kwargs):
        seen.append(torch.backends.mkldnn.matmul.fp32_precision)
        return original(*args, **kwargs)

    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        with pytest.MonkeyPatch.context() as m:
            m.setattr(engine, "_final_states", spy)
            result = engine.run_many(PROMPTS[:1], [ProbeSpec("skip")], "all", ("kl",), GenerationSpec(2))
        assert not isinstance(result[0], Exception), result[0]
        assert seen == ["ieee"] and torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


def test_no_autograd_graph_is_kept(engine):
    """Sweeps run under no_grad: staged final states carry no graph (a graph would hold every
    block's activations of every staged prompt)."""
    staged = []
    original = engine._final_states

    def spy(*args, **kwargs):
        staged.append(original(*args, **kwargs))
        return staged[-1]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(engine, "_final_states", spy)
        _run(engine, "skip")
    assert staged and not any(h.requires_grad or h.grad_fn is not None for h in staged)


def test_minus_infinite_logits_are_zero_terms_not_errors(family, engine, monkeypatch):
    """Tokens the head can never produce (logit -inf under P and Q alike) contribute 0 to KL(P||Q);
    the chunked pass hands such items to the row path, which says so (divergence.kl_rows)."""
    monkeypatch.setattr(unembed, "VOCAB_CHUNK", 16)
    head = engine.adapter.head
    bias = torch.zeros(VOCAB)
    bias[VOCAB - 20 :] = -torch.inf  # a whole chunk (80-95) and part of another
    monkeypatch.setattr(head, "bias", torch.nn.Parameter(bias, requires_grad=False))
    result = _run(engine, "logit_lens", PROMPTS[:1])[0]
    with monkeypatch.context() as m:
        m.setattr(unembed, "applies", lambda adapter, divergences: False)
        expected = _run(engine, "logit_lens", PROMPTS[:1])[0]
    assert result.errors == () and np.isfinite(result.values["kl"]).all()
    np.testing.assert_allclose(result.values["kl"], expected.values["kl"], atol=1e-6)


@pytest.mark.parametrize("chunk", [7, 29])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox"])  # (tiny Gemma 3 in bf16 fails verify)
def test_bfloat16_ranks_agree_with_the_row_path(family, monkeypatch, chunk):
    """bfloat16 logits tie often; Gen t's own logit must round as the chunks' do, so a token tied
    with it is never counted above it (ties share the better rank)."""
    from tiny_models import ToyTokenizer

    from klstore.core.engine import Engine
    from klstore.core.models import from_objects

    engine = Engine(from_objects(family, build(family, torch.bfloat16), ToyTokenizer()))
    monkeypatch.setattr(unembed, "VOCAB_CHUNK", chunk)
    fused = _run(engine, "logit_lens", n=8)
    monkeypatch.setattr(unembed, "applies", lambda adapter, divergences: False)
    rows = _run(engine, "logit_lens", n=8)
    for a, b in zip(fused, rows):
        np.testing.assert_array_equal(a.gen_rank, b.gen_rank)
        np.testing.assert_array_equal(a.top1_match, b.top1_match)
