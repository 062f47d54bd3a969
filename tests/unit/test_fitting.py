"""Lens fitting (klstore.core.fitting) without Ray: the least-squares lens against numpy's lstsq
in float64, the schedule, the training loss against its definition, and the evaluation sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import build

from klstore.core import fitting, lenses
from klstore.core.adapter import Adapter


@pytest.fixture(scope="module")
def tiny():
    model = build("llama")
    model.requires_grad_(False)
    return model, Adapter.discover(model)


def _ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def test_least_squares_matches_numpy_lstsq_in_float64(tiny):
    model, adapter = tiny
    sums = fitting.NormalSums.zeros(adapter.n_layers, 32)
    batches = [_ids(3, 20, seed) for seed in range(3)]  # 180 tokens > d + 1 = 33 unknowns per output
    states = []
    for ids in batches:
        outputs, _ = fitting.block_states(model, adapter, ids)
        sums.add(outputs)
        states.append([o.reshape(-1, 32).double().numpy() for o in outputs])
    assert sums.tokens == 180
    lens = sums.solve()
    target = np.concatenate([s[-1] for s in states])
    for layer in range(adapter.n_layers - 1):
        x = np.concatenate([s[layer] for s in states])
        x1 = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        solution, *_ = np.linalg.lstsq(x1, target, rcond=None)  # y = x @ A^T + c
        a_t, c = solution[:32], solution[32]
        np.testing.assert_allclose(lens.weight[layer].double().numpy(), (a_t - np.eye(32)).T, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(lens.bias[layer].double().numpy(), c, atol=2e-5, rtol=1e-4)
        # and the lens does what it is fitted for: its translation of h_l is the lstsq prediction of h_{L-1}
        predicted = lens.translate((layer,), torch.tensor(x[None], dtype=torch.float32))[0].double().numpy()
        np.testing.assert_allclose(predicted, x1 @ solution, atol=1e-4)
    assert not lens.weight[-1].any() and not lens.bias[-1].any()


def test_normal_sums_from_any_split_add_up(tiny):
    model, adapter = tiny
    whole, halves = fitting.NormalSums.zeros(4, 32), [fitting.NormalSums.zeros(4, 32) for _ in range(2)]
    ids = _ids(4, 12, seed=7)
    whole.add(fitting.block_states(model, adapter, ids)[0])
    for half, part in zip(halves, (ids[:1], ids[1:])):
        half.add(fitting.block_states(model, adapter, part)[0])
    torch.testing.assert_close(halves[0].xtx + halves[1].xtx, whole.xtx, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(halves[0].xty + halves[1].xty, whole.xty, rtol=1e-9, atol=1e-9)


def test_training_loss_is_the_sum_over_layers_of_the_mean_forward_kl(tiny):
    model, adapter = tiny
    generator = torch.Generator().manual_seed(1)
    start = lenses.AffineLens("tuned", torch.randn(4, 32, 32, generator=generator) * 0.05, torch.randn(4, 32) * 0.1)
    translators = fitting.Translators(start)
    outputs, final_logp = fitting.block_states(model, adapter, _ids(2, 10, seed=3))
    loss = translators(adapter, outputs, final_logp)
    model64 = build("llama", torch.float64).requires_grad_(False)
    adapter64 = Adapter.discover(model64)
    p = final_logp.double().exp()
    expected = 0.0
    for layer in range(3):
        h = outputs[layer].double()
        h = h + h @ start.weight[layer].double().T + start.bias[layer].double()
        logq = adapter64.logits(h).double().log_softmax(-1)
        expected += float((p * (final_logp.double() - logq)).sum(-1).mean())
    assert abs(float(loss.detach()) - expected) < 1e-5 * max(1.0, expected)
    loss.backward()
    assert translators.weight.grad[:3].abs().sum() > 0 and not translators.weight.grad[3].any()


def test_learning_rate_schedule():
    assert [fitting.learning_rate(s, 1.0, 0, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [fitting.learning_rate(s, 2.0, 2, 6) for s in range(6)] == [1.0, 2.0, 2.0, 1.5, 1.0, 0.5]


def test_evaluate_logit_lens_last_layer_is_zero_and_sums_add(tiny):
    model, adapter = tiny
    batches = [_ids(2, 8, seed=4), _ids(1, 8, seed=5)]
    whole = fitting.evaluate(model, adapter, None, batches)
    parts = [fitting.evaluate(model, adapter, None, [b]) for b in batches]
    assert whole[-1].kl == pytest.approx(0.0, abs=1e-6) and whole[-1].top1 == 1.0
    for layer in range(4):
        assert whole[layer].tokens == 24
        assert whole[layer].kl_sum == pytest.approx(parts[0][layer].kl_sum + parts[1][layer].kl_sum, rel=1e-9)
        assert whole[layer].kl >= 0


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Training failed due to worker errors:\n  File x\nklstore.errors.KlstoreError: corpus c is empty",
            "corpus c is empty",
        ),
        (
            "ray.train.WorkerGroupError: failed\nTraceback\n  ...\nValueError: shapes do not match",
            "ValueError: shapes do not match",
        ),
        (
            "Training failed due to worker errors:\nRay killed 4 worker(s) ... out of memory: memory usage 95%",
            "a worker was killed for lack of memory",
        ),
    ],
)
def test_a_failed_fit_names_the_workers_reason_in_one_line(text, expected):
    from klstore.run.fit import _worker_error

    message = _worker_error(RuntimeError(text))
    assert expected in message and "\n" not in message
