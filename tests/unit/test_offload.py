"""A model dispatched by accelerate (blocks offloaded to CPU and disk) gives the plain model's
numbers, and the engine's per-block forward patching leaves accelerate's hooks in place."""

import numpy as np
import pytest
import transformers

from klstore.core.engine import Engine
from klstore.core.models import from_objects
from klstore.spec import GenerationSpec, ProbeSpec, Prompt
from tiny_models import ToyTokenizer, build

PROMPT = Prompt("a", "The quick brown fox", source="A lazy dog sleeps")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload")
    model = build("llama")
    model.save_pretrained(folder / "model")
    plain = Engine(from_objects("plain", model, ToyTokenizer()))
    # so little CPU memory that half the blocks, the norm and the head go to disk
    dispatched = transformers.AutoModelForCausalLM.from_pretrained(
        folder / "model", device_map="auto", max_memory={"cpu": "120KB"}, offload_folder=str(folder / "off"))
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
