"""The Jacobian lens's estimator (klstore.core.jacobian) against an independent float64
computation: torch.autograd.functional.jacobian of the last block's output with respect to
block l's output over the whole (positions x d) input, summed and averaged by hand."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, build

from klstore.core import jacobian
from klstore.core.adapter import Adapter


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def reference_jacobian(model64, ids: torch.Tensor, layer: int, skip: int) -> torch.Tensor:
    """(d, d) float64: (1/|V|) sum_{t in V} sum_{t' in V} d h_final,t' / d h_layer,t, with the
    derivative taken by autograd.functional.jacobian on a function that replaces block `layer`'s
    output by its argument and returns the last block's output."""
    adapter = Adapter.discover(model64)
    with torch.no_grad():
        captured = {}
        handle = adapter.blocks[layer].register_forward_hook(lambda m, a, o: captured.setdefault("h", _first(o)))
        model64(input_ids=ids, use_cache=False)
        handle.remove()

    def final_of(h):
        out = {}

        def replace(_m, _a, o):
            return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h

        hooks = [adapter.blocks[layer].register_forward_hook(replace)]
        hooks.append(adapter.blocks[-1].register_forward_hook(lambda m, a, o: out.setdefault("y", _first(o))))
        try:
            model64(input_ids=ids, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        return out["y"][0]  # (T, d)

    full = torch.autograd.functional.jacobian(final_of, captured["h"])  # (T, d, 1, T, d)
    full = full[:, :, 0]  # (t', j, t, i)
    n_tokens = ids.shape[1]
    valid = list(range(skip, n_tokens - 1))
    total = torch.zeros(full.shape[1], full.shape[3], dtype=torch.float64)
    for t in valid:
        for t_prime in valid:
            if t_prime >= t:
                total += full[t_prime, :, t, :]
    return total / len(valid)


@pytest.mark.parametrize("family", FAMILIES)
def test_estimator_matches_autograd_jacobian_in_float64(family):
    model64 = build(family, torch.float64).requires_grad_(False)
    adapter = Adapter.discover(model64)
    ids = torch.randint(1, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    skip = 3
    mine = jacobian.prompt_jacobian(
        model64, adapter, ids, skip=skip, dim_batch=5
    )  # 32 = 6 x 5 + 2: a ragged last batch
    for layer in (1,):
        expected = reference_jacobian(model64, ids, layer, skip)
        error = (mine[layer] - expected).norm() / expected.norm()
        # 1e-6, not float64's 1e-15: the families' RMSNorms compute in float32 even in a float64
        # model, and the two ways sum the same float32 gradients in different orders (~1e-7)
        assert error < 1e-6, f"{family} layer {layer}: relative Frobenius error {error:.3g}"
    torch.testing.assert_close(mine[-1], torch.eye(32, dtype=torch.float64))  # the last block: the identity


def test_no_valid_position_and_the_exact_merge():
    model = build("llama").requires_grad_(False)
    adapter = Adapter.discover(model)
    assert jacobian.prompt_jacobian(model, adapter, torch.ones(1, 4, dtype=torch.long), skip=3) is None
    prompts = [torch.randint(1, 96, (1, n), generator=torch.Generator().manual_seed(n)) for n in (6, 8, 7, 3)]
    whole = jacobian.JacobianSums.zeros(4, 32)
    for ids in prompts:
        whole.add(jacobian.prompt_jacobian(model, adapter, ids, skip=2, dim_batch=16))
    assert (whole.prompts, whole.skipped) == (3, 1)  # the 3-token prompt has no valid position
    parts = [jacobian.JacobianSums.zeros(4, 32) for _ in range(2)]
    for i, ids in enumerate(prompts):
        parts[i % 2].add(jacobian.prompt_jacobian(model, adapter, ids, skip=2, dim_batch=16))
    for order in (parts, parts[::-1]):
        merged = jacobian.JacobianSums.zeros(4, 32)
        for part in order:
            merged.merge(part)
        torch.testing.assert_close(merged.mean(), whole.mean(), rtol=1e-12, atol=1e-12)
    lens = whole.lens()
    assert lens.kind == "jacobian" and not lens.weight[-1].any() and not lens.bias.any()
    torch.testing.assert_close(
        lens.weight[0].double() + torch.eye(32, dtype=torch.float64), whole.mean()[0].float().double()
    )


@pytest.mark.parametrize("dim_batch", [1, 7, 32, 64])
def test_dim_batch_does_not_change_the_estimate_and_the_model_is_left_as_found(dim_batch):
    """Any dim_batch (one row per pass, a ragged last pass, all rows in one pass, more rows than
    d) gives the same J; a model whose parameters train keeps them trainable, with no gradient
    accumulated by the fit."""
    model = build("llama", torch.float64)  # parameters require grad, as a loaded model's do
    adapter = Adapter.discover(model)
    ids = torch.randint(1, 96, (1, 8), generator=torch.Generator().manual_seed(5))
    reference = build("llama", torch.float64).requires_grad_(False)  # the same seeded weights
    frozen = jacobian.prompt_jacobian(reference, Adapter.discover(reference), ids, skip=2, dim_batch=32)
    got = jacobian.prompt_jacobian(model, adapter, ids, skip=2, dim_batch=dim_batch)
    torch.testing.assert_close(got, frozen, rtol=1e-9, atol=1e-12)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
