"""Probes: what replaces the clean model's distribution at layer l (docs/conventions.md §5).

A probe is either a *read-out* (logit_lens: decode block l's output, no extra
forward pass) or an *intervention* (everything else): it says what block l's
output becomes, given the block's clean input and output (and, for ablations,
a way to recompute the block), and the model's output distribution after that
change is Q. The engine runs every intervention through one shared layer sweep
(engine.py), so a probe only describes its change to one block.

Interventions and their parameters:
    skip                  block l is bypassed: output := input
    ablate_attn           block l's attention sub-layer output is zeroed
    ablate_mlp            block l's MLP sub-layer output is zeroed
    noise  scale, seed    + N(0, (scale * rms(h))^2) at every position, rms over the hidden
                          dimension of that position; seeded per (seed, prompt id, layer)
    steer  alpha, vector | positive + negative [, save]
                          + alpha * v_l at every position
    patch                 the output at the last prompt position := the same block's
                          output at the last position of the prompt's `source` prompt

The probe names and their parameters are declared in klstore.spec (PROBES).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from klstore.errors import KlstoreError
from klstore.spec import ProbeSpec


@dataclass
class BlockSite:
    """What an intervention sees at block `layer` for the rows it acts on (one row per prompt).

    hidden_in:  (R, T, H) the block's clean input (everything below is clean)
    clean_out:  (R, T, H) the block's clean output
    run:        computes the block on given inputs: (R, T, H) -> (R, T, H)
    sublayer:   'attn' | 'mlp' -> that sub-module of this block
    """

    layer: int
    hidden_in: torch.Tensor
    clean_out: torch.Tensor
    run: Callable[[torch.Tensor], torch.Tensor]
    sublayer: Callable[[str], torch.nn.Module]


@dataclass
class ProbeContext:
    """Per-prompt data an intervention needs beyond the block itself."""

    prompt_id: str
    steer_vectors: torch.Tensor | None = None  # (n_layers, H)
    source_last: torch.Tensor | None = None  # (n_layers, H): source prompt's block outputs, last position
    patch_position: int | None = None  # the last prompt position
    # patch: the clean KV cache of the positions before patch_position, so the layer sweep
    # recomputes only the positions from the patched one on (sweeps.run_rows_from); built
    # when that sweep is chosen (sweeps.from_position)
    prefix_cache: object | None = None
    from_position: bool | None = None  # patch: force that sweep (True) or the whole-sequence one; None: the cheaper


def noise_seed(seed: int, prompt_id: str, layer: int) -> int:
    """The generator seed for one (seed, prompt, layer): stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}\x1f{prompt_id}\x1f{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def noise_tensor(seed: int, prompt_id: str, layer: int, shape) -> torch.Tensor:
    """Standard normal noise (float32, CPU) for (seed, prompt, layer), before scaling."""
    generator = torch.Generator().manual_seed(noise_seed(seed, prompt_id, layer))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def rms(hidden: torch.Tensor) -> torch.Tensor:
    """Root mean square over the hidden dimension, per position: (..., H) -> (..., 1)."""
    return hidden.float().pow(2).mean(-1, keepdim=True).sqrt()


def _zero_output(_module, _args, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]),) + tuple(output[1:])
    return torch.zeros_like(output)


def intervene(spec: ProbeSpec, site: BlockSite, context: ProbeContext) -> torch.Tensor:
    """Block `site.layer`'s output under the probe. Returns (R, T, H)."""
    name, params = spec.name, spec.params
    if name == "skip":
        return site.hidden_in
    if name in ("ablate_attn", "ablate_mlp"):
        handle = site.sublayer(name.removeprefix("ablate_")).register_forward_hook(_zero_output)
        try:
            return site.run(site.hidden_in)
        finally:
            handle.remove()
    out = site.clean_out
    if name == "noise":
        noise = noise_tensor(params["seed"], context.prompt_id, site.layer, out.shape[1:])
        delta = params["scale"] * rms(out) * noise.to(out.device)
        return (out.float() + delta).to(out.dtype)
    if name == "steer":
        if context.steer_vectors is None:
            raise KlstoreError(
                f"probe steer has no steering vectors for prompt {context.prompt_id!r} (see Engine.probe_context)"
            )
        vector = context.steer_vectors[site.layer].to(out.device, torch.float32)
        return (out.float() + params["alpha"] * vector).to(out.dtype)
    if name == "patch":
        if context.source_last is None or context.patch_position is None:
            raise KlstoreError(
                f"probe patch has no source outputs for prompt {context.prompt_id!r} (see Engine.probe_context)"
            )
        patched = out.clone()
        patched[:, context.patch_position] = context.source_last[site.layer].to(out.device, out.dtype)
        return patched
    raise KlstoreError(f"probe {name!r} is not an intervention")
