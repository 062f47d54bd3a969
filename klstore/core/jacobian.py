"""The Jacobian lens's estimator (Gurnee et al. 2026; docs/conventions.md, "Lenses").

For one prompt of T tokens and a source block l, with V the valid positions (the first `skip`
and the last excluded) and h_final the last block's output (before the final norm):

    J_l(prompt) = (1 / |V|) sum_{t in V} sum_{t' in V, t' >= t} d h_final,t' / d h_l,t      (d x d)

and the lens's J_l is the mean of J_l(prompt) over prompts. Row j of the double sum is the
gradient, at h_l, of sum_{t' in V} h_final[t', j], summed over t in V (the model is causal, so
positions t' < t contribute nothing). One backward pass gives it for every source block at
once; `dim_batch` copies of the prompt in one batch give `dim_batch` rows per pass, so a
prompt costs one forward pass of `dim_batch` copies (its graph kept) and ceil(d / dim_batch)
backward passes, as TransformerLens's estimator does, but over the valid positions only: the
first `skip` positions enter as a constant KV cache (`prompt_jacobian`).

`JacobianSums` holds the sum over prompts (float64) and the prompt count: partial sums from
any split of the prompts add up exactly, in any order, and `mean()` is the lens.

A fit may cover some source blocks only (`source_layers`, `source_blocks`): the backward
passes then stop at the shallowest of them, and the lens refuses to read the others.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from klstore.core.adapter import Adapter
from klstore.core.lenses import AffineLens
from klstore.errors import KlstoreError
from klstore.spec import parse_layers

DEFAULT_SKIP = 16  # leading positions excluded from V (the reference's default)
DEFAULT_DIM_BATCH = 8  # output dimensions per backward pass


def valid_positions(n_tokens: int, skip: int) -> range:
    """V: positions skip .. T-2 (the first `skip` and the last excluded); empty when T <= skip + 1."""
    return range(skip, max(skip, n_tokens - 1))


def source_blocks(source_layers: str | None, n_layers: int, model_name: str = "the model") -> tuple[int, ...] | None:
    """The blocks a fit covers: None for every block but the last (the default), else the
    layer spec's blocks without the last (its J is the identity, never fitted)."""
    if source_layers is None:
        return None
    blocks = tuple(b for b in parse_layers(source_layers, n_layers, model_name) if b != n_layers - 1)
    if not blocks:
        raise KlstoreError(
            f"jacobian: source_layers {source_layers!r} names only the last block ({n_layers - 1} of {model_name}), "
            "whose J is the identity: nothing to fit"
        )
    return None if blocks == tuple(range(n_layers - 1)) else blocks


def prompt_jacobian(
    model,
    adapter: Adapter,
    input_ids: torch.Tensor,
    skip: int = DEFAULT_SKIP,
    dim_batch: int = DEFAULT_DIM_BATCH,
    blocks: tuple[int, ...] | None = None,
) -> torch.Tensor | None:
    """(L, d, d) float64: J_l(prompt) for every block l (the last is the identity), for one
    prompt `input_ids` (1, T); None when the prompt has no valid position. With `blocks` (some
    source blocks, the last excluded): (len(blocks), d, d), J_l for those blocks only, and the
    backward passes stop at the shallowest.

    Only positions in V need a gradient, and (the model being causal) a state at t in V depends
    on no state after it and reaches none before it. So:
    - the first `skip` positions run once, without a graph, into the model's KV cache, which the
      rest of the pass reads as a constant: the backward passes never visit them;
    - the last position, in no V and read by no earlier one, is not run at all;
    - positions skip..T-2 (V itself) run as `dim_batch` copies in one forward pass whose graph
      is kept; each of the ceil(d / dim_batch) backward passes seeds row r of the batch with
      output dimension start + r at every target position, and asks autograd for the gradients
      at the block outputs only (the parameters are frozen for the duration, so no weight
      gradient is built).
    The result equals the whole-sequence estimator's (TransformerLens's) to float32 rounding
    (tests/unit/test_jacobian.py against autograd.functional.jacobian over the whole input)."""
    valid = valid_positions(input_ids.shape[1], skip)
    if len(valid) == 0:
        return None
    embed = model.get_input_embeddings()
    n_layers = adapter.n_layers
    d_model = embed.weight.shape[1]
    if blocks is None:
        rows = torch.zeros(n_layers, d_model, d_model, dtype=torch.float64)
        rows[-1] = torch.eye(d_model, dtype=torch.float64)  # d h_final / d h_final = I
        if n_layers == 1:
            return rows
        wanted = tuple(range(n_layers - 1))
    else:
        rows = torch.zeros(len(blocks), d_model, d_model, dtype=torch.float64)
        wanted = blocks
    parameters = inspect.signature(model.forward).parameters
    keep_one = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    cache_arg = "cache" if "cache" in parameters else "past_key_values"  # transformers >= 5.x: cache
    batch = min(dim_batch, d_model)
    with torch.no_grad():
        embedded = embed(input_ids[:, : valid[-1] + 1]).expand(batch, -1, -1)  # (b, T - 1, d)
        context: dict = {"use_cache": False}
        if skip:  # the first `skip` positions: context only, their keys and values a constant
            prefix = model(inputs_embeds=embedded[:, :skip], use_cache=True, **keep_one)
            cache = getattr(prefix, "cache", None)
            context = {cache_arg: prefix.past_key_values if cache is None else cache, "use_cache": True}
    outputs: list[torch.Tensor] = []

    def keep(_module, _args, out):
        outputs.append(out[0] if isinstance(out, tuple) else out)

    trainable = [p for p in model.parameters() if p.requires_grad]
    handles = [block.register_forward_hook(keep) for block in adapter.blocks]
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        with torch.enable_grad():
            x = embedded[:, skip:].detach().clone().requires_grad_(True)  # (b, |V|, d): V's positions
            model(inputs_embeds=x, **context, **keep_one)  # the head's output is not needed
            target, sources = outputs[-1], [outputs[b] for b in wanted]
            seed = torch.zeros_like(target)  # (b, |V|, d): 1 at (row r, every t', start + r)
            starts = range(0, d_model, batch)
            for start in starts:
                dims = range(start, min(start + batch, d_model))
                seed.zero_()
                for r, j in enumerate(dims):
                    seed[r, :, j] = 1.0
                grads = torch.autograd.grad(target, sources, seed, retain_graph=start != starts[-1])
                for layer, grad in enumerate(grads):  # row r = d(sum_{t' in V} h_final[t', j]) / d h_l
                    # the sum over t in V, in the gradient's dtype, then float64 for the sums
                    # over rows and prompts
                    rows[layer, start : start + len(dims)] = grad[: len(dims)].sum(1).double().cpu()
                del grads
    finally:
        for handle in handles:
            handle.remove()
        for parameter in trainable:
            parameter.requires_grad_(True)
    if blocks is None:
        rows[:-1] /= len(valid)
    else:
        rows /= len(valid)
    return rows


@dataclass
class JacobianSums:
    """The sum over prompts of J_l(prompt) (float64) and how many prompts it holds; prompts with
    no valid position are counted apart (`skipped`). A fit of some blocks (`blocks`) holds
    their rows only, of a model with `n_layers` blocks."""

    total: torch.Tensor  # (L, d, d) float64; with blocks: (len(blocks), d, d)
    prompts: int = 0
    skipped: int = 0
    seen: list = field(default_factory=list)  # shard keys merged in (provenance, order-free)
    blocks: tuple[int, ...] | None = None
    n_layers: int = 0  # the model's depth (total's first dimension when blocks is None)

    def __post_init__(self) -> None:
        if self.blocks is None:
            self.n_layers = self.total.shape[0]

    @classmethod
    def zeros(cls, n_layers: int, d_model: int, blocks: tuple[int, ...] | None = None) -> JacobianSums:
        rows = n_layers if blocks is None else len(blocks)
        return cls(torch.zeros(rows, d_model, d_model, dtype=torch.float64), blocks=blocks, n_layers=n_layers)

    def add(self, jacobian: torch.Tensor | None) -> None:
        if jacobian is None:
            self.skipped += 1
        else:
            self.total += jacobian
            self.prompts += 1

    def merge(self, other: JacobianSums) -> None:
        if other.blocks != self.blocks or other.n_layers != self.n_layers:
            raise ValueError(f"cannot merge sums over blocks {other.blocks} into sums over {self.blocks}")
        self.total += other.total
        self.prompts += other.prompts
        self.skipped += other.skipped
        self.seen += other.seen

    def mean(self) -> torch.Tensor:
        """(L, d, d) float64: J_l, the prompt-weighted mean."""
        if not self.prompts:
            raise ValueError("no prompt had a valid position")
        return self.total / self.prompts

    def lens(self, **meta) -> AffineLens:
        """The J-lens as translators: W_l = J_l - I, b_l = 0; the last block is the identity
        (and, for a fit of some blocks, every block outside them: the lens refuses to read those)."""
        jac = self.mean()
        d_model = jac.shape[-1]
        eye = torch.eye(d_model, dtype=torch.float64)
        if self.blocks is None:
            weight = (jac - eye).float()
            weight[-1] = 0.0
        else:
            weight = torch.zeros(self.n_layers, d_model, d_model)
            for row, block in enumerate(self.blocks):
                weight[block] = (jac[row] - eye).float()
        return AffineLens("jacobian", weight, torch.zeros(self.n_layers, d_model), blocks=self.blocks, **meta)
