"""A clean trace + a probe -> the final residual states to decode, per layer (the layer sweep).

A read-out (the logit lens, a fitted lens) reads the recorded block outputs. An intervention
runs the *layer sweep*: one batch whose row r intervenes at block l_r (`SweepRows`). Blocks
below l_r return the recorded clean output without computing (the computation there is
identical to the clean pass), and the forward stops after the last block (`StopForward`),
so only the positions that predict Gen t reach the unembedding. `patch` may instead sweep
only the positions from the patched one on, over a clean prefix KV cache
(`run_rows_from`), whichever needs fewer block-positions (`from_position`).

Memory: `sweep_rows` bounds the rows per sweep by `chunk_bytes`.
Shapes: R probe rows, T positions, H hidden size, n generated tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import torch

from klstore.core.probes import BlockSite, ProbeContext, intervene
from klstore.core.runtime import ModelRuntime, StopForward
from klstore.core.tracing import Trace
from klstore.errors import KlstoreError
from klstore.spec import ProbeSpec


@dataclass(frozen=True)
class SweepRows:
    """One layer sweep's batch: row r intervenes with `probe` at block `layers[r]` of `trace`'s
    sequence (`context`: what the probe needs for this prompt)."""

    trace: Trace
    probe: ProbeSpec
    layers: tuple[int, ...]
    context: ProbeContext


def _hidden_arg(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _take_rows(value, rows: torch.Tensor, batch: int):
    """Slice batch-shaped tensors (dim >= 2, leading dim == batch) in block arguments."""
    if torch.is_tensor(value):
        if batch > 1 and value.dim() >= 2 and value.shape[0] == batch:
            return value[rows]
        return value
    if isinstance(value, tuple):
        return tuple(_take_rows(v, rows, batch) for v in value)
    return value


def _patch_only(_: object) -> NoReturn:
    """BlockSite.run and .sublayer in the sweep from the patched position (`run_rows_from`),
    which only patch takes, and patch uses neither."""
    raise NotImplementedError("the sweep from the patched position neither re-runs blocks nor reaches sub-layers")


def _replay(clean: torch.Tensor, batch: int, as_tuple: bool):
    out = clean.expand(batch, -1, -1)
    return lambda *args, **kwargs: (out,) if as_tuple else out


@torch.no_grad()
def prefix_cache(rt: ModelRuntime, ids: list[int]):
    """The clean KV cache of `ids` (the model's own cache type: sliding windows included)."""
    out = rt.model(input_ids=torch.tensor([ids], device=rt.device), use_cache=True, **rt.keep_kwargs)
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def sweep_rows(rt: ModelRuntime, trace: Trace, chunk_bytes: int) -> int:
    """Probe rows per layer sweep: each row carries about 2 x intermediate + 4 x hidden floats
    per position in a block, one attention row per head and position, and (patch from the
    patched position) its copy of the prefix KV cache, keys and values in every block."""
    text = rt.model.config.get_text_config()
    width = 2 * (getattr(text, "intermediate_size", None) or 4 * rt.hidden_size) + 4 * rt.hidden_size
    heads = getattr(text, "num_attention_heads", None) or 1
    kv_width = (getattr(text, "num_key_value_heads", None) or heads) * (
        getattr(text, "head_dim", None) or rt.hidden_size // heads
    )
    length = trace.input_ids.shape[1]
    per_row = 4 * length * (width + heads * length + 2 * rt.n_layers * kv_width)
    return max(1, chunk_bytes // per_row)


def final_hidden(
    rt: ModelRuntime,
    *,
    trace: Trace,
    probe: ProbeSpec,
    layers: tuple[int, ...],
    context: ProbeContext,
    chunk_bytes: int,
) -> Iterator[tuple[tuple[int, ...], torch.Tensor]]:
    """Yield (layer chunk, (R, n, H) residual stream to decode at the positions predicting Gen t)."""
    if probe.is_readout:  # the read-out: the recorded block outputs (on the last one's device)
        where = trace.outputs[-1].device
        yield (
            layers,
            torch.stack([trace.outputs[l][0, trace.positions.to(trace.outputs[l].device)].to(where) for l in layers]),
        )
        return
    per_sweep = sweep_rows(rt, trace, chunk_bytes)
    for start in range(0, len(layers), per_sweep):
        rows = SweepRows(trace, probe, layers[start : start + per_sweep], context)
        if from_position(rt, rows):  # patch: the positions from the patched one on
            patched = context.patch_position
            assert patched is not None  # from_position: a patch from a prompt position
            if context.prefix_cache is None:
                context.prefix_cache = prefix_cache(rt, trace.input_ids[0, :patched].tolist())
            final = run_rows_from(rt, rows)
            yield rows.layers, final[:, (trace.positions - patched).to(final.device)]
        else:  # an intervention: the layer sweep
            final = run_rows(rt, rows)
            yield rows.layers, final[:, trace.positions.to(final.device)]


def from_position(rt: ModelRuntime, rows: SweepRows) -> bool:
    """patch: whether to sweep only the positions from the patched one on (`run_rows_from`)
    rather than the whole sequence (`run_rows`), by block-position count: the whole
    sequence runs a row intervening at l through the blocks above l at all T positions;
    from the patched position p, every row runs through every block from the chunk's lowest
    layer up, at T - p positions, after a one-row pass over the p earlier positions for
    their KV cache (once per prompt). On long prompts the second wins by far (issue 13:
    6x at 234 tokens); on short ones the first."""
    context, chunk = rows.context, rows.layers
    start = context.patch_position
    if rows.probe.name != "patch" or not start:
        return False
    if context.from_position is not None:
        return context.from_position
    total, length = rt.n_layers, rows.trace.input_ids.shape[1]
    whole = sum(total - 1 - layer for layer in chunk) * length
    part = len(chunk) * (total - min(chunk)) * (length - start)
    if context.prefix_cache is None:
        part += total * start
    return part < whole


def run_rows(rt: ModelRuntime, rows: SweepRows) -> torch.Tensor:
    """Forward a batch where row r intervenes at block rows.layers[r]; returns last block output (R, T, H)."""
    trace, spec, row_layers, context = rows.trace, rows.probe, rows.layers, rows.context
    batch = len(row_layers)
    row_layer = torch.tensor(row_layers, device=rt.device)
    last = rt.n_layers - 1

    def make_forward(k: int, block):
        original = block.forward

        def forward(*args, **kwargs):
            out = trace.outputs[k].expand(batch, -1, -1)  # on block k's device
            hidden = _hidden_arg(args, kwargs).to(out.device)
            below = (row_layer < k).nonzero().flatten().to(out.device)  # rows already changed lower down
            here = (row_layer == k).nonzero().flatten().to(out.device)
            if below.numel() or here.numel():
                out = out.clone()

            def run(which: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                sliced_args = tuple(_take_rows(a, which, batch) for a in args[1:])
                sliced_kwargs = {
                    key: _take_rows(v, which, batch) for key, v in kwargs.items() if key != "hidden_states"
                }
                result = original(x, *sliced_args, **sliced_kwargs)
                return result[0] if isinstance(result, tuple) else result

            if below.numel():
                out[below] = run(below, hidden[below]).to(out.device)
            if here.numel():
                site = BlockSite(
                    layer=k,
                    hidden_in=hidden[here],
                    clean_out=trace.outputs[k].expand(here.numel(), -1, -1),
                    run=functools.partial(run, here),
                    sublayer=functools.partial(rt.adapter.sublayer, block, layer=k),
                )
                out[here] = intervene(spec, site, context).to(out.device)
            if k == last:
                raise StopForward(out)
            return (out,) if trace.returns_tuple else out

        return forward

    low = min(row_layers)
    forwards = {k: make_forward(k, rt.adapter.blocks[k]) for k in range(low, rt.n_layers)}
    # Blocks below the lowest intervened layer are replayed from the trace.
    forwards.update({k: _replay(trace.outputs[k], batch, trace.returns_tuple) for k in range(low)})
    return _sweep(rt, forwards, input_ids=trace.input_ids.expand(batch, -1), use_cache=False)


def _sweep(rt: ModelRuntime, forwards: dict, **model_inputs) -> torch.Tensor:
    """One model forward with block k's `forward` replaced by forwards[k]; returns the hidden
    state the last block raises (StopForward). A block's `forward` may already be an
    instance attribute: accelerate's hook wrapper (device_map, offload), which loads the
    block's weights and moves its inputs. Ours call it (`block.forward` at make time is that
    wrapper), and the finally puts the very same wrapper back."""
    blocks = rt.adapter.blocks
    originals = {k: blocks[k].__dict__.get("forward") for k in range(rt.n_layers)}
    try:
        for k, forward in forwards.items():
            blocks[k].forward = forward
        rt.model(**model_inputs)
        raise KlstoreError(f"{rt.label}: the last decoder block never ran")
    except StopForward as stop:
        return stop.hidden
    finally:
        for k, previous in originals.items():
            if previous is None:
                blocks[k].__dict__.pop("forward", None)
            else:
                blocks[k].forward = previous


def run_rows_from(rt: ModelRuntime, rows: SweepRows) -> torch.Tensor:
    """The layer sweep over positions `start = context.patch_position` onward only, for an
    intervention that leaves every earlier position clean (patch): those positions' keys and
    values come from the clean prefix cache. Returns the last block's output (R, T - start, H).

    Unlike `run_rows`, every row runs through every block from the lowest intervened
    layer up (a KV cache holds all R rows, so a block cannot run a subset of them); rows
    whose intervention lies higher are then reset to the clean output. On a long prompt
    this is still far less work: T - start positions instead of T."""
    trace, spec, row_layers, context = rows.trace, rows.probe, rows.layers, rows.context
    start = context.patch_position
    batch = len(row_layers)
    row_layer = torch.tensor(row_layers)
    last, low = rt.n_layers - 1, min(row_layers)
    shifted = dataclasses.replace(context, patch_position=0, prefix_cache=None)
    from transformers import Cache  # (imported already: the model is loaded)

    cache = copy.deepcopy(context.prefix_cache)
    assert isinstance(cache, Cache), "final_hidden builds the prefix cache before this sweep"
    cache.batch_repeat_interleave(batch)

    def make_forward(k: int, block):
        original = block.forward

        def forward(*args, **kwargs):
            clean = trace.outputs[k][:, start:]  # (1, T - start, H) on block k's device
            result = original(*args, **kwargs)  # every row: the cache's rows stay aligned
            out = (result[0] if isinstance(result, tuple) else result).to(clean.device).clone()
            above = (row_layer > k).nonzero().flatten().to(clean.device)  # still clean here
            here = (row_layer == k).nonzero().flatten().to(clean.device)
            if above.numel():
                out[above] = clean.to(out.dtype)
            if here.numel():
                site = BlockSite(
                    layer=k,
                    hidden_in=_hidden_arg(args, kwargs).to(clean.device)[here],
                    clean_out=clean.expand(here.numel(), -1, -1),
                    run=_patch_only,
                    sublayer=_patch_only,
                )
                out[here] = intervene(spec, site, shifted).to(out.dtype)
            if k == last:
                raise StopForward(out)
            return (out,) if trace.returns_tuple else out

        return forward

    forwards = {k: make_forward(k, rt.adapter.blocks[k]) for k in range(low, rt.n_layers)}
    forwards.update(
        {k: _replay(trace.outputs[k][:, start:], batch, trace.returns_tuple) for k in range(low)}
    )  # below every intervention: clean, replayed, never computed
    return _sweep(
        rt, forwards, input_ids=trace.input_ids[:, start:].expand(batch, -1), use_cache=True, **{rt.cache_arg: cache}
    )
