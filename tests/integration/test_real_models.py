"""The engine on the real offline models (SmolLM2-135M, Gemma-3-270M)."""

import copy

import numpy as np
import pytest
import torch
from lens_checks import check_lens_tokens
from reference import reference_matrices

from klstore.core import readout
from klstore.core.engine import Engine
from klstore.spec import GenerationSpec, ProbeSpec, Prompt

pytestmark = pytest.mark.real_model
PROMPT = Prompt("france", "The capital of France is")


def test_smollm2_matches_float64_reference(smollm2):
    engine = Engine(smollm2)
    lens, skip = engine.run(
        PROMPT,
        [ProbeSpec("logit_lens"), ProbeSpec("skip")],
        "all",
        ("kl", "kl_reverse", "js"),
        GenerationSpec(max_new_tokens=3),
    )
    gen = lens.generation
    assert gen.token_texts[0] == " Paris"
    model64 = copy.deepcopy(smollm2.model).double()
    sequence = list(gen.prompt_ids) + list(gen.token_ids[:-1])
    for result in (lens, skip):
        expected, _, logq64 = reference_matrices(
            model64, sequence, len(gen.prompt_ids), gen.n, result.probe, result.layers, return_logq=True
        )
        assert check_lens_tokens(result, logq64, 5) > 100  # top-5 of Q, Gen t's rank and log Q
        for name in ("kl", "kl_reverse", "js"):
            want = expected[name].numpy()
            excess = np.abs(result.values[name] - want) - 1e-4 * np.maximum(1.0, np.abs(want))
            assert (excess <= 0).all(), (result.probe, name, excess.max())


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_identities_on_real_models(which, request):
    loaded = request.getfixturevalue(which)
    engine = Engine(loaded)
    lens, skip = engine.run(
        PROMPT, [ProbeSpec("logit_lens"), ProbeSpec("skip")], "-2,-1", ("kl", "js"), GenerationSpec(max_new_tokens=4)
    )
    np.testing.assert_allclose(lens.values["kl"][-1], 0.0, atol=1e-5)
    assert lens.top1_match[-1].all()
    np.testing.assert_allclose(skip.values["kl"][-1], lens.values["kl"][0], rtol=1e-4, atol=1e-4)
    assert (lens.values["kl"][0] > 0.01).all()


def test_gemma_vocabulary_is_chunked(gemma3):
    """Rows of 262,144-entry log-probs go through in bounded chunks and agree with one big chunk."""
    small = Engine(gemma3, chunk_bytes=64 * 2**20)  # 8 cells: one layer, 8 positions per piece
    big = Engine(gemma3, chunk_bytes=2**34)
    assert readout.cells_per_chunk(262144, small.chunk_bytes) == 8
    a = small.run(PROMPT, [ProbeSpec("logit_lens")], "all", ("kl",), GenerationSpec(8))[0]
    b = big.run(PROMPT, [ProbeSpec("logit_lens")], "all", ("kl",), GenerationSpec(8))[0]
    assert a.values["kl"].shape == (18, 8)
    np.testing.assert_allclose(a.values["kl"], b.values["kl"], rtol=1e-6, atol=1e-6)


def test_dequantized_cache_equals_gguf(tmp_path, monkeypatch, smollm2):
    """The safetensors cache holds exactly the GGUF's dequantized weights."""
    import transformers

    from klstore.core import models

    monkeypatch.setenv("KLSTORE_CACHE", str(tmp_path))
    source = models.resolve("smollm2-135m")
    fresh = models.load_model("smollm2-135m", device="cpu")
    assert (models._gguf_cache_folder(source) / "model.safetensors").exists()
    direct = transformers.AutoModelForCausalLM.from_pretrained(
        source.location, gguf_file=source.gguf_file, dtype=torch.float32
    )
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(ids).logits, direct(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(smollm2.model(ids).logits, direct(ids).logits, rtol=0, atol=0)


def test_smollm2_padded_batch_equals_single_prompts(smollm2):
    from conftest import REPO

    from klstore.config import read_prompts

    prompts = read_prompts(REPO / "jobs" / "prompts" / "demo.jsonl")[::3]  # 8 prompts, 3 groups
    engine = Engine(smollm2)
    spec = GenerationSpec(max_new_tokens=5)
    batched = engine.run_many(prompts, [ProbeSpec("logit_lens"), ProbeSpec("skip")], "all", ("kl",), spec)
    for prompt, matrices in zip(prompts, batched):
        alone = engine.run(prompt, [ProbeSpec("logit_lens"), ProbeSpec("skip")], "all", ("kl",), spec)
        for a, b in zip(matrices, alone):
            assert a.generation.token_ids == b.generation.token_ids, prompt.id
            excess = np.abs(a.values["kl"] - b.values["kl"]) - 1e-4 * np.maximum(1.0, np.abs(b.values["kl"]))
            assert (excess <= 0).all(), (prompt.id, a.probe, excess.max())


def test_model_cache_filled_by_two_processes_at_once(tmp_path):
    """Two processes dequantize SmolLM2 into an empty cache at the same time: both succeed,
    one complete entry remains, no temporary folder is left, and a copy of the GGUF file
    elsewhere (another path, same content) uses that same entry."""
    import shutil
    import subprocess
    import sys

    from klstore.core.models import resolve

    env = {**__import__("os").environ, "KLSTORE_CACHE": str(tmp_path / "cache")}
    copy = tmp_path / "elsewhere" / "smol.gguf"
    copy.parent.mkdir()
    source = resolve("smollm2-135m")
    shutil.copy(f"{source.location}/{source.gguf_file}", copy)
    load = "import sys; from klstore.core.models import load_model; print(load_model(sys.argv[1]).label)"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", load, "smollm2-135m"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
    entries = sorted(p.name for p in (tmp_path / "cache" / "dequantized").iterdir())
    assert len(entries) == 1 and ".tmp-" not in entries[0], entries
    again = subprocess.run([sys.executable, "-c", load, str(copy)], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "dequantizing" not in again.stderr, again.stderr[-500:]
    assert sorted(p.name for p in (tmp_path / "cache" / "dequantized").iterdir()) == entries
