"""The engine against the slow float64 reference on tiny models of every family."""

import numpy as np
import pytest
import torch
from reference import LN2, reference_matrices
from tiny_models import ToyTokenizer, build

from klstore.core.adapter import Adapter
from klstore.core.engine import Engine
from klstore.core.models import from_objects
from klstore.errors import UnsupportedArchitecture
from klstore.spec import GenerationSpec, ProbeSpec, Prompt

PROMPT = Prompt("p1", "The quick brown fox", group="g")
DIVS = ("kl", "kl_reverse", "js")
NEAR_TIE = 1e-3  # nats between Q's two most likely tokens: float32 may break the tie either way


def _close(actual, expected):
    """1e-4 absolute, or 1e-4 relative above 1 (the tolerance the issue asks for)."""
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    excess = np.abs(actual - expected) - 1e-4 * np.maximum(1.0, np.abs(expected))
    assert (excess <= 0).all(), f"max excess {excess.max():.3g}\n{actual}\n{expected}"


@pytest.mark.parametrize("probe", ["logit_lens", "skip"])
def test_engine_matches_float64_reference(family, engine, probe):
    result = engine.run(PROMPT, [ProbeSpec(probe)], "all", DIVS, GenerationSpec(max_new_tokens=4))[0]
    gen = result.generation
    assert gen.n == 4 and result.layers == (0, 1, 2, 3)
    sequence = list(gen.prompt_ids) + list(gen.token_ids[:-1])
    model64 = build(family, torch.float64)
    expected, top1, margin = reference_matrices(
        model64, sequence, len(gen.prompt_ids), gen.n, probe, result.layers, return_margin=True
    )
    for name in DIVS:
        _close(result.values[name], expected[name].numpy())
    assert (result.values["kl"] > 1e-3).any(), "random tiny model should give visible KL"
    # top1 agrees wherever the float64 winner is not a near tie; near ties are skipped
    clear = (margin > NEAR_TIE).numpy()
    assert clear.any(), "every cell was a near tie: top1 was never compared"
    np.testing.assert_array_equal(result.top1_match[clear], (top1 == torch.tensor(gen.token_ids)).numpy()[clear])
    assert result.errors == ()


def test_properties_and_identities(engine):
    lens, skip = engine.run(
        PROMPT, [ProbeSpec("logit_lens"), ProbeSpec("skip")], "all", DIVS, GenerationSpec(max_new_tokens=5)
    )
    for result in (lens, skip):
        assert (result.values["kl"] >= 0).all() and (result.values["kl_reverse"] >= 0).all()
        assert ((result.values["js"] >= 0) & (result.values["js"] <= LN2)).all()
    # last layer's logit lens is the model's output
    np.testing.assert_allclose(lens.values["kl"][-1], 0.0, atol=1e-6)
    assert lens.top1_match[-1].all()
    # skipping the last block = logit lens of the block before it
    np.testing.assert_allclose(skip.values["kl"][-1], lens.values["kl"][-2], atol=1e-5, rtol=1e-4)


def test_layer_subset_equals_rows_of_all(engine):
    full = engine.run(PROMPT, [ProbeSpec("skip")], "all", ("kl",), GenerationSpec(3))[0]
    part = engine.run(PROMPT, [ProbeSpec("skip")], "-1,1", ("kl",), GenerationSpec(3))[0]
    assert part.layers == (1, 3)
    # The forward KL's dot products go through BLAS, whose summation order depends on how many
    # rows a batch has: up to ~2e-6 apart here (the 1e-5 bound of issue #13).
    np.testing.assert_allclose(part.values["kl"], full.values["kl"][[1, 3]], atol=1e-5, rtol=0)


def test_chunked_sweep_equals_unchunked(engine):
    small = Engine(engine.loaded, chunk_bytes=1)  # one row per chunk
    for probe in ("logit_lens", "skip"):
        a = engine.run(PROMPT, [ProbeSpec(probe)], "all", ("kl",), GenerationSpec(3))[0]
        b = small.run(PROMPT, [ProbeSpec(probe)], "all", ("kl",), GenerationSpec(3))[0]
        np.testing.assert_allclose(a.values["kl"], b.values["kl"], atol=1e-5, rtol=0)  # see above


def test_sampling_is_seeded(engine):
    spec = GenerationSpec(max_new_tokens=6, do_sample=True, seed=7)
    ids = engine.encode(PROMPT, spec)
    assert engine.generate(ids, spec) == engine.generate(ids, spec)
    other = [engine.generate(ids, GenerationSpec(6, do_sample=True, seed=s)).token_ids for s in range(8)]
    assert len(set(other)) > 1


def test_stops_at_eos_without_padding():
    model = build("llama")
    with torch.no_grad():  # make EOS (id 0) the certain next token
        model.lm_head.weight.zero_()
        model.lm_head.weight[0].fill_(1.0)
        model.model.norm.weight.fill_(1.0)
    engine = Engine(from_objects("eos", model, ToyTokenizer()))
    result = engine.run(PROMPT, [ProbeSpec("logit_lens")], "all", ("kl",), GenerationSpec(5))[0]
    gen = result.generation
    assert gen.stopped_at_eos and gen.token_ids[-1] == 0
    assert result.values["kl"].shape == (4, gen.n)


def test_unsupported_architecture_is_named():
    class NoBlocks(torch.nn.Module):
        config = build("llama").config

    with pytest.raises(UnsupportedArchitecture, match="NoBlocks: no list of 4 decoder blocks"):
        Adapter.discover(NoBlocks())
