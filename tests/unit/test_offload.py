"""A model dispatched by accelerate (blocks offloaded to CPU and disk) gives the plain model's
numbers, and the engine's per-block forward patching leaves accelerate's hooks in place."""

import numpy as np
import pytest
import transformers
from tiny_models import ToyTokenizer, build

from klstore.core.engine import Engine
from klstore.core.models import from_objects
from klstore.spec import GenerationSpec, ProbeSpec, Prompt

PROMPT = Prompt("a", "The quick brown fox", source="A lazy dog sleeps")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload")
    model = build("llama")
    model.save_pretrained(folder / "model")
    plain = Engine(from_objects("plain", model, ToyTokenizer()))
    # so little CPU memory that half the blocks, the norm and the head go to disk
    dispatched = transformers.AutoModelForCausalLM.from_pretrained(
        folder / "model", device_map="auto", max_memory={"cpu": "120KB"}, offload_folder=str(folder / "off")
    )
    offloaded = Engine(from_objects("offloaded", dispatched, ToyTokenizer()))
    hooks = [block.__dict__.get("forward") for block in offloaded.adapter.blocks]  # accelerate's wrappers
    return plain, offloaded, dispatched, hooks


def test_blocks_really_are_offloaded(engines):
    _, offloaded, model, hooks = engines
    assert "disk" in set(model.hf_device_map.values())
    assert all(hook is not None for hook in hooks)


@pytest.mark.parametrize("probe", ["logit_lens", "skip", "patch"])
def test_offloaded_equals_plain(engines, probe):
    plain, offloaded, _, hooks = engines
    for _ in range(2):  # and again: the hooks survive a sweep
        a = plain.run(PROMPT, [ProbeSpec(probe)], "all", ("kl", "js"), GenerationSpec(3))[0]
        b = offloaded.run(PROMPT, [ProbeSpec(probe)], "all", ("kl", "js"), GenerationSpec(3))[0]
        assert a.generation.token_ids == b.generation.token_ids
        for name in ("kl", "js"):
            np.testing.assert_allclose(b.values[name], a.values[name], rtol=1e-5, atol=1e-5)
        assert (a.values["kl"] > 1e-4).any()
    after = [block.__dict__.get("forward") for block in offloaded.adapter.blocks]
    assert all(a is b for a, b in zip(after, hooks))  # the very same accelerate wrappers


def test_load_model_dispatches_by_device_map(engines, tmp_path, monkeypatch):
    """The config's device_map path (klstore.core.models.load_model), offloading to disk."""
    from klstore.core.models import load_model

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: ToyTokenizer())
    plain, _, model, _ = engines
    folder = tmp_path / "m"
    build("llama").save_pretrained(folder)  # the same seeded weights as the fixture's model
    loaded = load_model(str(folder), device="cpu", device_map="auto", max_memory={"cpu": "120KB"})
    assert "disk" in set(loaded.model.hf_device_map.values())
    engine = Engine(from_objects("split", loaded.model, ToyTokenizer()))
    a = plain.run(PROMPT, [ProbeSpec("skip")], "all", ("kl",), GenerationSpec(3))[0]
    b = engine.run(PROMPT, [ProbeSpec("skip")], "all", ("kl",), GenerationSpec(3))[0]
    np.testing.assert_allclose(b.values["kl"], a.values["kl"], rtol=1e-5, atol=1e-5)


def test_a_block_left_on_meta_is_one_line_error(tmp_path, monkeypatch):
    """A device_map entry `meta` (the config refuses it; the loader checks again), and an
    in-memory model with weightless blocks: refused before any work, naming the module."""
    import accelerate

    from klstore.core.models import load_model
    from klstore.errors import KlstoreError

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: ToyTokenizer())
    folder = tmp_path / "m"
    build("llama").save_pretrained(folder)
    placed = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "meta",
        "model.layers.2": "cpu",
        "model.layers.3": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    with pytest.raises(KlstoreError, match=r"leaves 1 module\(s\) on the meta device.*model\.layers\.1"):
        load_model(str(folder), device="cpu", device_map=placed)
    with accelerate.init_empty_weights():
        empty = transformers.AutoModelForCausalLM.from_config(build("llama").config)
    with pytest.raises(KlstoreError, match="on the meta device") as info:
        from_objects("empty", empty, ToyTokenizer())
    assert "\n" not in str(info.value)
