"""Probes: what replaces the clean model's distribution at layer l (CONVENTIONS.md §5).

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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from klstore.errors import KlstoreError

PROBES = ("logit_lens", "skip", "ablate_attn", "ablate_mlp", "noise", "steer", "patch")

# allowed parameters -> (types, default); None default means required/optional as noted
_PARAMS = {
    "logit_lens": {},
    "skip": {},
    "ablate_attn": {},
    "ablate_mlp": {},
    "noise": {"scale": ((int, float), 1.0), "seed": ((int,), 0)},
    "steer": {"alpha": ((int, float), 1.0), "vector": ((str,), None), "positive": ((str,), None),
              "negative": ((str,), None), "save": ((str,), None)},
    "patch": {},
}


@dataclass(frozen=True)
class ProbeSpec:
    """A probe name plus its parameters (e.g. noise scale and seed), validated on creation."""

    name: str
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in PROBES:
            raise KlstoreError(f"unknown probe {self.name!r}: choose from {', '.join(PROBES)}")
        allowed = _PARAMS[self.name]
        full = {}
        for key, value in self.params.items():
            if key not in allowed:
                extra = f" (allowed: {', '.join(allowed)})" if allowed else " (it takes none)"
                raise KlstoreError(f"probe {self.name}: unknown parameter {key!r}{extra}")
            types, _ = allowed[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
                raise KlstoreError(f"probe {self.name}: {key} must be "
                                   f"{'a number' if float in types else types[0].__name__}, got {value!r}")
        for key, (_, default) in allowed.items():
            value = self.params.get(key, default)
            if value is not None:
                full[key] = value
        if self.name == "noise" and full["scale"] < 0:
            raise KlstoreError(f"probe noise: scale must be >= 0, got {full['scale']}")
        if self.name == "steer":
            has_file = "vector" in full
            has_sets = "positive" in full or "negative" in full
            if has_file == has_sets or (has_sets and not ("positive" in full and "negative" in full)):
                raise KlstoreError("probe steer: give either vector (a .pt, .npy or .safetensors file) "
                                   "or both positive and negative (prompt files)")
        object.__setattr__(self, "params", full)

    @property
    def is_readout(self) -> bool:
        return self.name == "logit_lens"

    def key(self) -> tuple:
        return (self.name, tuple(sorted(self.params.items())))


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
        vector = context.steer_vectors[site.layer].to(out.device, torch.float32)
        return (out.float() + params["alpha"] * vector).to(out.dtype)
    if name == "patch":
        patched = out.clone()
        patched[:, context.patch_position] = context.source_last[site.layer].to(out.dtype)
        return patched
    raise KlstoreError(f"probe {name!r} is not an intervention")


# ------------------------------------------------------------- steering vectors
def load_vector(path: str, n_layers: int, hidden: int) -> torch.Tensor:
    """A steering vector file -> (n_layers, H) float32; [H] is used at every layer."""
    import os

    if not os.path.isfile(path):
        raise KlstoreError(f"steering vector file not found: {path}")
    try:
        if path.endswith(".npy"):
            import numpy as np

            tensor = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(path)
            if len(tensors) != 1:
                raise KlstoreError(f"{path}: expected one tensor, found {', '.join(tensors) or 'none'}")
            tensor = next(iter(tensors.values()))
        elif path.endswith(".pt"):
            tensor = torch.load(path, map_location="cpu", weights_only=True)
            if not torch.is_tensor(tensor):
                raise KlstoreError(f"{path}: expected a tensor, found {type(tensor).__name__}")
        else:
            raise KlstoreError(f"steering vector {path}: use a .pt, .npy or .safetensors file")
    except KlstoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error naming it
        raise KlstoreError(f"cannot read steering vector {path}: {str(exc).splitlines()[0]}") from None
    tensor = tensor.float()
    if tensor.dim() == 1:
        if tensor.shape[0] != hidden:
            raise KlstoreError(f"steering vector {path} has width {tensor.shape[0]}; the model's hidden size is {hidden}")
        return tensor.expand(n_layers, hidden).clone()
    if tensor.dim() == 2:
        if tensor.shape != (n_layers, hidden):
            raise KlstoreError(f"steering vector {path} has shape {list(tensor.shape)}; "
                               f"the model needs [{hidden}] or [{n_layers}, {hidden}]")
        return tensor
    raise KlstoreError(f"steering vector {path} has shape {list(tensor.shape)}; "
                       f"the model needs [{hidden}] or [{n_layers}, {hidden}]")


def save_vector(path: str, vectors: torch.Tensor) -> None:
    """Save (n_layers, H) steering vectors for reuse (format from the suffix)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({"steer": vectors.contiguous()}, path)
    elif path.endswith(".npy"):
        import numpy as np

        np.save(path, vectors.numpy())
    elif path.endswith(".pt"):
        torch.save(vectors, path)
    else:
        raise KlstoreError(f"steering vector {path}: use a .pt, .npy or .safetensors file")

