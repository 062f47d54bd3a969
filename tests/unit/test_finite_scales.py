"""Numbers that scale logits or activations (issue 21, item 3): every finite value gives a
finite computation or a recorded, one-line non-finite outcome, never a traceback.

- temperature: every finite value > 0 is accepted. The sampler computes
  softmax((logits - max) / T) in float64 (`generation.sampling_probs`), which is finite for
  every such T: a tiny T tends to greedy, a huge one to uniform.
- noise scale and steering alpha: every finite value is accepted. A value that overflows the
  model's dtype makes the probed states non-finite; the engine records those cells as
  non-finite (null in the store, the prompt's status `nonfinite`) and the other prompts and
  probes go on.
"""

import math

import numpy as np
import pytest
import torch
from tiny_models import ToyTokenizer, build

from klstore.core.engine import Engine
from klstore.core.generation import sampling_probs
from klstore.core.models import from_objects
from klstore.errors import KlstoreError
from klstore.run.worker import Worker
from klstore.spec import ComputeSpec, GenerationSpec, ProbeSpec, Prompt
from klstore.store import views

PROMPTS = [Prompt("a", "The quick brown fox"), Prompt("b", "Hello there")]


@pytest.mark.parametrize("temperature", [1e-2, 0.7, 1.0, 3.0, 250.0])
def test_sampling_probs_against_float64(temperature):
    logits = torch.randn(96, generator=torch.Generator().manual_seed(3)) * 20
    expected = torch.softmax(logits.double() / temperature, -1)
    got = sampling_probs(logits, temperature)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-40, 1e-30, 1e-8])
def test_tiny_temperature_is_greedy(temperature):
    logits = torch.tensor([1.0, 3.5, -2.0, 3.25, float("-inf")])
    probs = sampling_probs(logits, temperature)
    assert torch.equal(probs, torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("temperature", [1e8, 1e38, 3.5e38, 1e300, 1.7976931348623157e308])
def test_huge_temperature_is_uniform_over_finite_logits(temperature):
    logits = torch.tensor([1.0, 3.5, -2.0, 3.25, float("-inf")])
    probs = sampling_probs(logits, temperature)
    assert torch.isfinite(probs).all()
    np.testing.assert_allclose(probs.numpy(), [0.25, 0.25, 0.25, 0.25, 0.0], atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_one_line_error(bad):
    with pytest.raises(KlstoreError, match="logits are not finite"):
        sampling_probs(torch.tensor([1.0, bad, 0.0]), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [5e-324, 1e-40])
def test_tiny_temperature_samples_the_greedy_continuation(dtype, temperature):
    engine = Engine(from_objects("tiny", build("llama", dtype), ToyTokenizer()))
    ids = engine.encode(PROMPTS[0], GenerationSpec(5))
    greedy = engine.generate(ids, GenerationSpec(5))
    sampled = engine.generate(ids, GenerationSpec(5, do_sample=True, temperature=temperature, seed=4))
    assert sampled.token_ids == greedy.token_ids


def _stored(tmp_path, dtype, probe, generation):
    root = str(tmp_path / "store")
    worker = Worker("tiny", "tiny", root, loaded=from_objects("tiny", build("llama", dtype), ToyTokenizer()))
    worker.run_shard("r1", PROMPTS, ComputeSpec((probe,), "all", ("kl", "js"), generation))
    _, prompts = views.sql(root, "SELECT prompt_id, status, error FROM prompts ORDER BY 1")
    _, cells = views.sql(root, "SELECT kl, js FROM kl")
    return prompts, cells


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [5e-324, 1e-40, 1e38, 1.7976931348623157e308])
def test_extreme_temperatures_store_finite_runs(tmp_path, dtype, temperature):
    prompts, cells = _stored(
        tmp_path, dtype, ProbeSpec("logit_lens"), GenerationSpec(3, do_sample=True, temperature=temperature)
    )
    assert [status for _, status, _ in prompts] == ["ok", "ok"], prompts
    assert len(cells) == 2 * 4 * 3 and all(kl >= 0 and 0 <= js <= math.log(2) + 1e-6 for kl, js in cells)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "probe",
    [
        ("noise", {"scale": 1e38}),
        ("noise", {"scale": 3.4e38}),
        ("noise", {"scale": 1.7976931348623157e308}),
        ("steer", {"alpha": 1e308}),
        ("steer", {"alpha": -1e308}),
        ("steer", {"alpha": 3.4e38}),
    ],
)
def test_overflowing_scales_are_recorded_nonfinite(tmp_path, dtype, probe):
    name, params = probe
    if name == "steer":
        torch.save(torch.ones(32), tmp_path / "v.pt")
        params = {**params, "vector": str(tmp_path / "v.pt")}
    prompts, cells = _stored(tmp_path, dtype, ProbeSpec(name, params), GenerationSpec(2))
    for _, status, error in prompts:
        assert status in ("ok", "nonfinite"), prompts
        if status == "nonfinite":
            assert error.startswith("non-finite ") and "\n" not in error
    # a cell is a finite divergence or null, never a stored non-finite number
    assert len(cells) == 2 * 4 * 2
    assert all((kl is None) == (js is None) and (kl is None or (math.isfinite(kl) and kl >= 0)) for kl, js in cells)
    assert any(status == "nonfinite" for _, status, _ in prompts) or all(kl is not None for kl, _ in cells)
