"""Fitting and evaluating trained lenses on a packed corpus (docs/conventions.md, "Lenses").

Everything here is per process and knows nothing of Ray: klstore.run.fit spreads it over
Ray Train workers, whose process group sums what is summed here.

- `block_states` runs the frozen model on a batch of sequences and returns every block's
  output and the model's own log-probabilities (the distribution every lens is fitted to).
- The least-squares lens (Din et al. 2023, "Jump to Conclusions") maps h_l affinely to the
  last block's output h_{L-1}: per layer, `NormalSums` accumulates [h, 1]^T [h, 1] and
  [h, 1]^T h_{L-1} in float64 (sums over tokens, so partial sums from any split of the corpus
  add up exactly), and `solve` gives the map in one pass over the corpus.
- The tuned lens (Belrose et al. 2023) is trained by `TunedTrainer`: the loss is the forward
  KL(final || lens) averaged over tokens and summed over layers, minimised by SGD with
  Nesterov momentum under a linear warm-up and linear decay (tuned-lens's recipe).
- `evaluate` gives per layer the mean KL to the final distribution and the top-1 agreement
  with the final prediction: the `lens_eval` table's numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from klstore.core.adapter import Adapter
from klstore.core.lenses import AffineLens


@torch.no_grad()
def block_states(model, adapter: Adapter, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([L] block outputs (B, T, d), the model's log-probs (B, T, V) float32) for `input_ids`."""
    outputs: list[torch.Tensor] = []
    handles = [
        block.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
        for block in adapter.blocks
    ]
    try:
        logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return outputs, logits.float().log_softmax(-1)


# ------------------------------------------------------------------ least squares
@dataclass
class NormalSums:
    """Per layer l < L-1: xtx = sum [h_l, 1]^T [h_l, 1] ((d+1)^2) and xty = sum [h_l, 1]^T h_{L-1}
    ((d+1) x d), float64, over `tokens` tokens."""

    xtx: torch.Tensor  # (L-1, d+1, d+1)
    xty: torch.Tensor  # (L-1, d+1, d)
    tokens: int = 0

    @classmethod
    def zeros(cls, n_layers: int, d_model: int) -> NormalSums:
        return cls(
            torch.zeros(n_layers - 1, d_model + 1, d_model + 1, dtype=torch.float64),
            torch.zeros(n_layers - 1, d_model + 1, d_model, dtype=torch.float64),
        )

    def add(self, outputs: list[torch.Tensor]) -> None:
        """Add one batch's block outputs (every position of every sequence is a token)."""
        target = outputs[-1].reshape(-1, outputs[-1].shape[-1]).double()
        ones = torch.ones(target.shape[0], 1, dtype=torch.float64)
        for layer, hidden in enumerate(outputs[:-1]):
            x = torch.cat([hidden.reshape(-1, hidden.shape[-1]).double().cpu(), ones], dim=1)
            self.xtx[layer] += x.T @ x
            self.xty[layer] += x.T @ target.cpu()
        self.tokens += target.shape[0]

    def solve(self, **meta) -> AffineLens:
        """The least-squares lens: per layer the affine map minimising sum ||A h_l + c - h_{L-1}||^2
        (the minimum-norm solution where the normal equations are singular), as translators
        W_l = A_l - I, b_l = c_l; the last block is the identity."""
        n_minus_1, d1, d = self.xty.shape
        weight = torch.zeros(n_minus_1 + 1, d, d)
        bias = torch.zeros(n_minus_1 + 1, d)
        for layer in range(n_minus_1):
            solution = torch.linalg.lstsq(self.xtx[layer], self.xty[layer], driver="gelsd").solution  # (d+1, d)
            a_transposed, c = solution[:d], solution[d]  # y = x @ a_transposed + c
            weight[layer] = (a_transposed - torch.eye(d, dtype=torch.float64)).T.float()
            bias[layer] = c.float()
        return AffineLens("least_squares", weight, bias, **meta)


# ------------------------------------------------------------------ tuned lens
def lens_logprobs(adapter: Adapter, weight: torch.Tensor, bias: torch.Tensor, hidden: torch.Tensor):
    """log Q of block `layer`'s states (..., d) through translator (weight, bias): differentiable
    in the translator, the model's own final norm and head frozen."""
    wide = hidden.to(torch.promote_types(hidden.dtype, weight.dtype))  # a bf16 model's states, float32 translators
    translated = wide + wide @ weight.T + bias
    return adapter.logits(translated.to(hidden.dtype)).log_softmax(-1)


def kl_to_final(final_logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(final || Q), nats (forward KL, as every kl value in klstore)."""
    return (final_logp.exp() * (final_logp - logq)).sum(-1).mean()


def learning_rate(step: int, lr: float, warmup_steps: int, total_steps: int) -> float:
    """tuned-lens's schedule: linear warm-up from 0 over `warmup_steps`, then linear decay to 0
    at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    remaining = max(0, total_steps - step)
    return lr * remaining / max(1, total_steps - warmup_steps)


class Translators(torch.nn.Module):
    """The trainable parameters of an affine lens: weight (L, d, d) and bias (L, d). The last
    block's translator is never trained (the identity)."""

    def __init__(self, start: AffineLens):
        super().__init__()
        self.weight = torch.nn.Parameter(start.weight.clone())
        self.bias = torch.nn.Parameter(start.bias.clone())

    def forward(self, adapter: Adapter, outputs: list[torch.Tensor], final_logp: torch.Tensor) -> torch.Tensor:
        """The training loss of one micro-batch: the sum over blocks l < L-1 of the mean
        KL(final || lens_l) over its tokens (a module's forward, so DDP averages its gradients)."""
        total = torch.zeros((), dtype=torch.float32)
        final_p = final_logp.exp()
        for layer, hidden in enumerate(outputs[:-1]):
            logq = lens_logprobs(adapter, self.weight[layer], self.bias[layer], hidden)
            total = total + (final_p * (final_logp - logq)).sum(-1).mean()
        return total

    def lens(self, kind: str = "tuned", **meta) -> AffineLens:
        weight, bias = self.weight.detach().clone(), self.bias.detach().clone()
        weight[-1], bias[-1] = 0.0, 0.0
        return AffineLens(kind, weight, bias, **meta)


def sgd(parameters, lr: float, momentum: float, weight_decay: float, nesterov: bool) -> torch.optim.SGD:
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


# ------------------------------------------------------------------ evaluation
@dataclass
class LayerEval:
    """Sums over held-out tokens for one layer (so partial sums from several workers add up)."""

    kl_sum: float = 0.0
    top1_sum: int = 0
    tokens: int = 0

    @property
    def kl(self) -> float:
        return self.kl_sum / self.tokens if self.tokens else math.nan

    @property
    def top1(self) -> float:
        return self.top1_sum / self.tokens if self.tokens else math.nan


@torch.no_grad()
def evaluate(model, adapter: Adapter, lens: AffineLens | None, batches) -> list[LayerEval]:
    """Per block: sum of KL(final || lens read-out) and of top-1 agreement with the final
    prediction over every token of `batches` (input-id tensors (B, T)); `lens` None: the logit lens.
    A lens fitted at some blocks only is evaluated there (and at the last); the others stay empty."""
    sums: list[LayerEval] = []
    readable = None if lens is None else set(lens.readable)
    for input_ids in batches:
        outputs, final_logp = block_states(model, adapter, input_ids)
        final_top = final_logp.argmax(-1)
        if not sums:
            sums = [LayerEval() for _ in outputs]
        for layer, hidden in enumerate(outputs):
            if readable is not None and layer not in readable:
                continue
            if lens is not None:
                hidden = lens.translate((layer,) * hidden.shape[0], hidden)
            logq = adapter.log_probs(hidden).float()
            kl = (final_logp.exp() * (final_logp - logq)).sum(-1)
            sums[layer].kl_sum += float(kl.double().sum())
            sums[layer].top1_sum += int((logq.argmax(-1) == final_top).sum())
            sums[layer].tokens += kl.numel()
    return sums
