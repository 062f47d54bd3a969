"""Steering vectors for the `steer` probe: read from a file, or the difference of mean
activations of two prompt sets (and saved if asked). The one place in the core that
touches files for a probe; the engine itself only receives tensors.
"""

from __future__ import annotations

import os

import torch

from klstore.config import read_prompts
from klstore.errors import KlstoreError, first_line
from klstore.spec import GenerationSpec, ProbeSpec


def prepare_probes(engine, probes, generation: GenerationSpec) -> None:
    """Check every probe against the engine's model before any work, giving `steer` its vectors."""
    for probe in probes:
        vectors = steer_vectors(engine, probe, generation) if probe.name == "steer" else None
        engine.prepare(probe, steer_vectors=vectors)


def steer_vectors(engine, spec: ProbeSpec, generation: GenerationSpec) -> torch.Tensor:
    """(n_layers, H) vectors: from `vector`, or mean(positive) - mean(negative) of block outputs
    at each prompt's last position (saved to `save` if given)."""
    params = spec.params
    if "vector" in params:
        return load_vector(params["vector"], engine.n_layers, engine.hidden_size)
    sets = [read_prompts(params[key]) for key in ("positive", "negative")]
    vectors = engine.mean_activation_difference(sets[0], sets[1], generation).cpu()
    if "save" in params:
        save_vector(params["save"], vectors)
    return vectors


def load_vector(path: str, n_layers: int, hidden: int) -> torch.Tensor:
    """A steering vector file -> (n_layers, H) float32; [H] is used at every layer."""
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
        raise KlstoreError(f"cannot read steering vector {path}: {first_line(exc)}") from None
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise KlstoreError(f"steering vector {path} holds {bad} non-finite value(s) (NaN or infinity)")
    if tensor.dim() == 1:
        if tensor.shape[0] != hidden:
            raise KlstoreError(
                f"steering vector {path} has width {tensor.shape[0]}; the model's hidden size is {hidden}"
            )
        return tensor.expand(n_layers, hidden).clone()
    if tensor.dim() == 2:
        if tensor.shape != (n_layers, hidden):
            raise KlstoreError(
                f"steering vector {path} has shape {list(tensor.shape)}; "
                f"the model needs [{hidden}] or [{n_layers}, {hidden}]"
            )
        return tensor
    raise KlstoreError(
        f"steering vector {path} has shape {list(tensor.shape)}; the model needs [{hidden}] or [{n_layers}, {hidden}]"
    )


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
