"""Intervention probes against the slow float64 reference on tiny models of every family."""

import numpy as np
import pytest
import torch
from reference import reference_matrices
from tiny_models import ToyTokenizer, build

from klstore.core import sweeps
from klstore.core.engine import Engine
from klstore.core.models import from_objects
from klstore.core.steering import prepare_probes, steer_vectors
from klstore.errors import KlstoreError, UnsupportedArchitecture
from klstore.spec import GenerationSpec, ProbeSpec, Prompt

PROMPT = Prompt("p1", "The quick brown fox", group="g", source="A lazy dog sleeps")
DIVS = ("kl", "kl_reverse", "js")
HIDDEN, LAYERS = 32, 4


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vec") / "v.pt"
    torch.save(torch.linspace(-1, 1, LAYERS * HIDDEN).reshape(LAYERS, HIDDEN), path)
    return str(path)


def _run(engine, prompt, probes, layers="all", divergences=("kl",), generation=GenerationSpec()):
    """engine.run after the probes are prepared (steering vectors read), as the worker does."""
    prepare_probes(engine, probes, generation)
    return engine.run(prompt, probes, layers, divergences, generation)


def _close(actual, expected):
    excess = np.abs(actual - expected) - 1e-4 * np.maximum(1.0, np.abs(expected))
    assert (excess <= 0).all(), f"max excess {excess.max():.3g}\n{actual}\n{expected}"


def _specs(vector_file):
    return {
        "ablate_attn": ProbeSpec("ablate_attn"),
        "ablate_mlp": ProbeSpec("ablate_mlp"),
        "noise": ProbeSpec("noise", {"scale": 0.5, "seed": 3}),
        "steer": ProbeSpec("steer", {"alpha": 2.0, "vector": vector_file}),
        "patch": ProbeSpec("patch"),
    }


@pytest.mark.parametrize("probe", ["ablate_attn", "ablate_mlp", "noise", "steer", "patch"])
def test_probe_matches_float64_reference(family, engine, probe, vector_file):
    spec = _specs(vector_file)[probe]
    result = _run(engine, PROMPT, [spec], "all", DIVS, GenerationSpec(max_new_tokens=4))[0]
    gen = result.generation
    sequence = list(gen.prompt_ids) + list(gen.token_ids[:-1])
    params = {
        "scale": 0.5,
        "seed": 3,
        "prompt_id": PROMPT.id,
        "alpha": 2.0,
        "vectors": torch.load(vector_file),
        "source_ids": ToyTokenizer()(PROMPT.source)["input_ids"],
    }
    expected, top1 = reference_matrices(
        build(family, torch.float64), sequence, len(gen.prompt_ids), gen.n, probe, result.layers, params
    )
    for name in DIVS:
        _close(result.values[name], expected[name].numpy())
    assert (result.values["kl"] > 1e-4).any()
    np.testing.assert_array_equal(result.top1_match, (top1 == torch.tensor(gen.token_ids)).numpy())


def test_null_interventions_give_zero(engine, vector_file, tmp_path):
    same_source = Prompt("p2", "The quick brown fox", source="The quick brown fox")
    zero_steer = ProbeSpec("steer", {"alpha": 0.0, "vector": vector_file})
    zero_noise = ProbeSpec("noise", {"scale": 0.0, "seed": 1})
    for prompt, spec in [(PROMPT, zero_steer), (PROMPT, zero_noise), (same_source, ProbeSpec("patch"))]:
        result = _run(engine, prompt, [spec], "all", ("kl", "js"), GenerationSpec(4))[0]
        np.testing.assert_allclose(result.values["kl"], 0.0, atol=1e-6)
        np.testing.assert_allclose(result.values["js"], 0.0, atol=1e-6)


def test_noise_is_identical_across_runs(family):
    spec = ProbeSpec("noise", {"scale": 1.0, "seed": 5})
    a = _run(Engine(from_objects(family, build(family), ToyTokenizer())), PROMPT, [spec], "all", ("kl",))[0]
    b = _run(Engine(from_objects(family, build(family), ToyTokenizer())), PROMPT, [spec], "all", ("kl",))[0]
    np.testing.assert_array_equal(a.values["kl"], b.values["kl"])
    other = _run(
        Engine(from_objects(family, build(family), ToyTokenizer())),
        PROMPT,
        [ProbeSpec("noise", {"scale": 1.0, "seed": 6})],
        "all",
        ("kl",),
    )[0]
    assert not np.array_equal(a.values["kl"], other.values["kl"])


def test_batched_rows_equal_one_row_at_a_time(engine, vector_file):
    one_row = Engine(engine.loaded, chunk_bytes=1)
    for spec in _specs(vector_file).values():
        a = _run(engine, PROMPT, [spec], "all", ("kl",), GenerationSpec(3))[0]
        b = _run(one_row, PROMPT, [spec], "all", ("kl",), GenerationSpec(3))[0]
        np.testing.assert_allclose(a.values["kl"], b.values["kl"], atol=1e-5, rtol=1e-5)


def test_steer_from_prompt_sets_and_saved_vector(tmp_path):
    engine = Engine(from_objects("llama", build("llama"), ToyTokenizer()))
    pos, neg = tmp_path / "pos.jsonl", tmp_path / "neg.jsonl"
    pos.write_text('{"id": "a", "text": "happy joyful day"}\n{"id": "b", "text": "great fun"}\n')
    neg.write_text('{"id": "c", "text": "sad gloomy night"}\n')
    saved = tmp_path / "v.safetensors"
    spec = ProbeSpec("steer", {"alpha": 1.5, "positive": str(pos), "negative": str(neg), "save": str(saved)})
    from_sets = _run(engine, PROMPT, [spec], "all", ("kl",))[0]
    vectors = steer_vectors(engine, spec, GenerationSpec())
    expected = torch.stack(
        [engine.last_position_outputs(ToyTokenizer()(t)["input_ids"]) for t in ("happy joyful day", "great fun")]
    ).mean(0) - engine.last_position_outputs(ToyTokenizer()("sad gloomy night")["input_ids"])
    torch.testing.assert_close(vectors, expected)
    reused = _run(engine, PROMPT, [ProbeSpec("steer", {"alpha": 1.5, "vector": str(saved)})], "all", ("kl",))[0]
    np.testing.assert_allclose(reused.values["kl"], from_sets.values["kl"], rtol=1e-6, atol=1e-7)


def test_single_vector_is_used_at_every_layer(tmp_path):
    engine = Engine(from_objects("llama", build("llama"), ToyTokenizer()))
    flat, full = tmp_path / "flat.npy", tmp_path / "full.npy"
    v = np.linspace(0, 1, HIDDEN, dtype=np.float32)
    np.save(flat, v)
    np.save(full, np.stack([v] * LAYERS))
    a = _run(engine, PROMPT, [ProbeSpec("steer", {"alpha": 3, "vector": str(flat)})], "all", ("kl",))[0]
    b = _run(engine, PROMPT, [ProbeSpec("steer", {"alpha": 3, "vector": str(full)})], "all", ("kl",))[0]
    np.testing.assert_array_equal(a.values["kl"], b.values["kl"])


def test_bad_probe_input(tmp_path):
    engine = Engine(from_objects("llama", build("llama"), ToyTokenizer()))
    wide, layers3, junk = tmp_path / "wide.pt", tmp_path / "l3.pt", tmp_path / "junk.pt"
    torch.save(torch.zeros(HIDDEN + 1), wide)
    torch.save(torch.zeros(3, HIDDEN), layers3)
    junk.write_bytes(b"not a tensor")
    cases = [
        (
            lambda: prepare_probes(engine, [ProbeSpec("steer", {"vector": str(wide)})], GenerationSpec()),
            "has width 33; the model's hidden size is 32",
        ),
        (
            lambda: prepare_probes(engine, [ProbeSpec("steer", {"vector": str(layers3)})], GenerationSpec()),
            "has shape [3, 32]; the model needs [32] or [4, 32]",
        ),
        (
            lambda: prepare_probes(
                engine, [ProbeSpec("steer", {"vector": str(tmp_path / "none.pt")})], GenerationSpec()
            ),
            "steering vector file not found",
        ),
        (
            lambda: prepare_probes(engine, [ProbeSpec("steer", {"vector": str(junk)})], GenerationSpec()),
            "cannot read steering vector",
        ),
        (lambda: ProbeSpec("noise", {"scale": -1}), "scale must be >= 0, got -1"),
        (lambda: ProbeSpec("steer", {"alpha": 1}), "give either vector"),
        (lambda: ProbeSpec("skip", {"scale": 1}), "probe skip: unknown parameter 'scale'"),
        (lambda: _run(engine, Prompt("nosrc", "hello"), [ProbeSpec("patch")]), "prompt 'nosrc' has no source"),
    ]
    for call, message in cases:
        with pytest.raises(KlstoreError, match=message.replace("[", r"\[").replace("]", r"\]")):
            call()


def test_ablate_without_sublayers_is_named():
    model = build("llama")
    for layer in model.model.layers:
        layer.mixer = layer.self_attn
        del layer.self_attn
    engine = Engine.__new__(Engine)  # the adapter check alone; this model cannot run forward
    from klstore.core.adapter import Adapter

    engine.adapter = Adapter.discover(model)
    with pytest.raises(UnsupportedArchitecture, match="block 0 \\(LlamaDecoderLayer\\) has no recognisable attention"):
        Engine.prepare(engine, ProbeSpec("ablate_attn"))


BATCH = [
    Prompt("a", "The quick brown fox", source="Hi"),
    Prompt("b", "Hello", source="A lazy dog sleeps"),
    Prompt("c", "Sphinx of black quartz, judge my vow", source="x y z"),
]


def test_padded_batches_equal_one_prompt_at_a_time(engine, vector_file):
    """Generation and the clean trace run left-padded over several prompts; every number matches."""
    specs = list(_specs(vector_file).values()) + [ProbeSpec("logit_lens"), ProbeSpec("skip")]
    gen = GenerationSpec(max_new_tokens=4)
    batched = engine.run_many(BATCH, specs, "all", ("kl", "js"), gen)
    for prompt, matrices in zip(BATCH, batched):
        alone = _run(engine, prompt, specs, "all", ("kl", "js"), gen)
        for a, b in zip(matrices, alone):
            assert a.generation.token_ids == b.generation.token_ids
            np.testing.assert_allclose(a.values["kl"], b.values["kl"], atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(a.values["js"], b.values["js"], atol=2e-5, rtol=1e-4)


def test_sampled_batches_equal_one_prompt_at_a_time(engine):
    gen = GenerationSpec(max_new_tokens=6, do_sample=True, seed=11)
    ids = [engine.encode(p, gen) for p in BATCH]
    assert engine.generate_batch(ids, gen) == [engine.generate(i, gen) for i in ids]


def test_one_failing_prompt_does_not_stop_the_batch(engine):
    prompts = [BATCH[0], Prompt("long", "x" * 200), Prompt("nosrc", "hello"), BATCH[1]]
    results = engine.run_many(prompts, [ProbeSpec("patch")], "all", ("kl",), GenerationSpec(3))
    assert isinstance(results[1], KlstoreError) and "exceeds" in str(results[1])
    assert isinstance(results[2], KlstoreError) and "has no source" in str(results[2])
    assert results[0][0].values["kl"].shape == (LAYERS, 3) and results[3][0].values["kl"].shape[0] == LAYERS


def test_from_position_patch_sweep_matches_float64_reference(family, engine, monkeypatch):
    """patch's sweep over the positions from the patched one on (a clean prefix KV cache), forced,
    against the float64 reference. (On PROMPT the engine itself takes the whole-sequence sweep,
    which test_probe_matches_float64_reference[patch] checks.)"""
    monkeypatch.setattr(sweeps, "from_position", lambda rt, rows: True)
    result = _run(engine, PROMPT, [ProbeSpec("patch")], "all", DIVS, GenerationSpec(max_new_tokens=4))[0]
    gen = result.generation
    sequence = list(gen.prompt_ids) + list(gen.token_ids[:-1])
    params = {"source_ids": ToyTokenizer()(PROMPT.source)["input_ids"]}
    expected, _ = reference_matrices(
        build(family, torch.float64), sequence, len(gen.prompt_ids), gen.n, "patch", result.layers, params
    )
    for name in DIVS:
        _close(result.values[name], expected[name].numpy())


@pytest.mark.parametrize("text, chosen", [("The quick brown fox", False), ("The quick brown fox " * 3, True)])
def test_patch_sweep_is_chosen_by_cost_and_the_cache_built_only_then(engine, monkeypatch, text, chosen):
    """4 layers, 4 tokens: 19 prompt tokens cost less over the whole sequence (6 x 22 block-positions
    against 4 x 4 x 4 + 4 x 18); 60 cost less from the patched position (6 x 63 against 64 + 4 x 59)."""
    built, decisions = [], []
    make_cache, decide = sweeps.prefix_cache, sweeps.from_position
    monkeypatch.setattr(sweeps, "prefix_cache", lambda rt, ids: built.append(len(ids)) or make_cache(rt, ids))
    monkeypatch.setattr(sweeps, "from_position", lambda *a: decisions.append(decide(*a)) or decisions[-1])
    prompt = Prompt("p", text, source=text.replace("fox", "cat"))
    _run(engine, prompt, [ProbeSpec("patch")], "all", ("kl",), GenerationSpec(max_new_tokens=4))
    assert decisions == [chosen]
    assert built == ([len(text) - 1] if chosen else [])
