"""Checks of lens tokens (top-k of Q, the generated token's rank and log Q) against a float64 log Q."""

import numpy as np
import torch

TIE = 1e-4  # log-prob gap under which float32 may order two tokens either way


def check_lens_tokens(result, logq64: torch.Tensor, k: int) -> int:
    """Assert `result`'s lens tokens equal the float64 log Q (cells x vocab); returns how many
    rank/id comparisons were made (ties within TIE excepted)."""
    gen_ids = torch.tensor(result.generation.token_ids)
    q64 = logq64.exp()
    compared = 0
    # probabilities of the top-k tokens, in rank order, equal the reference's k largest
    expected = q64.topk(k, dim=-1).values.numpy()
    np.testing.assert_allclose(result.topk_probs, expected, atol=1e-5, rtol=1e-4)
    # ids: equal at every rank whose neighbours are not within TIE
    sorted64 = logq64.sort(dim=-1, descending=True).values[..., : k + 1]
    gaps = (sorted64[..., :-1] - sorted64[..., 1:]).numpy()  # gap to the next rank
    before = np.concatenate([np.full(gaps.shape[:-1] + (1,), np.inf), gaps[..., :-1]], axis=-1)
    clear = (gaps > TIE) & (before > TIE)
    ids64 = logq64.topk(k, dim=-1).indices.numpy()
    np.testing.assert_array_equal(result.topk_ids[clear], ids64[clear])
    compared += int(clear.sum())
    # the generated token: log Q(Gen t), and its rank = 1 + #{v: Q(v) > Q(Gen t)}
    target = logq64.gather(-1, gen_ids.expand(logq64.shape[0], -1).unsqueeze(-1))  # (L, n, 1)
    np.testing.assert_allclose(result.gen_logq, target[..., 0].numpy(), atol=1e-4, rtol=1e-4)
    rank64 = (1 + (logq64 > target).sum(-1)).numpy()
    near = ((logq64 - target).abs() < TIE).sum(-1).numpy() > 1  # another token ties with it
    np.testing.assert_array_equal(result.gen_rank[~near], rank64[~near])
    compared += int((~near).sum())
    assert (result.gen_rank >= 1).all()
    return compared
