"""The checks made before any work, the same for `klstore run` (before it joins Ray) and
`klstore compute` (before the model loads): everything about an experiment that would fail
every prompt of a model, read from the model's config without its weights.

Per model (a local model: built-in, folder or .gguf file; a hub id is checked after its load,
by the same rules):
- the layers against its depth;
- `max_new_tokens` against its context (even a one-token prompt would not fit);
- each `steer` vector file against its depth and hidden size.

A problem of one prompt (empty, or too long with its continuation) is that prompt's: `run`
records it as failed and goes on with the others (a run of many prompts is not refused for
one), while `compute` refuses it before any work, as it checks every prompt it was given
(`core.generation.encode`).
"""

from __future__ import annotations

from klstore.errors import KlstoreError
from klstore.spec import ComputeSpec, ExperimentConfig, ProbeSpec, parse_layers


def check_experiment(cfg: ExperimentConfig) -> None:
    """`check_model` for every model of an experiment (`klstore run`, before Ray starts)."""
    for model in cfg.models:
        check_model(model.name, model.label, cfg.compute, model.trust_remote_code)


def check_model(name: str, label: str, compute: ComputeSpec, trust_remote_code: bool = False) -> None:
    """Raise the first KlstoreError this model would raise on every prompt of `compute`, before
    its weights load (`label` names it in messages). A hub id is not read here: its load checks
    the same."""
    from klstore.core.models import read_shape

    shape = read_shape(name, trust_remote_code)
    if shape is None:
        return
    parse_layers(compute.layers, shape.n_layers, label)
    new_tokens = compute.generation.max_new_tokens
    if shape.context_length and new_tokens >= shape.context_length:
        raise KlstoreError(
            f"{new_tokens} new tokens: with any prompt that exceeds {label}'s context of {shape.context_length}"
        )
    if shape.hidden_size:
        _check_vectors(compute.probes, shape.n_layers, shape.hidden_size)
        if any(probe.is_readout for probe in compute.probes):
            _check_lenses(compute, label, shape.n_layers, shape.hidden_size)


def _check_lenses(compute: ComputeSpec, label: str, n_layers: int, hidden: int) -> None:
    """Each fitted lens against the model's depth and width (its unembedding is checked on load)."""
    from klstore.core import lenses

    for spec in compute.lens:
        if spec.kind != "logit" and spec.resolved:  # a store id is checked when the run resolves it
            lens = lenses.check_fits(lenses.load(spec.source), n_layers, hidden, None, f"lens {spec.id} (for {label})")
            lenses.check_layers(lens, parse_layers(compute.layers, n_layers, label), f"lens {spec.id} (for {label})")


def _check_vectors(probes: tuple[ProbeSpec, ...] | list[ProbeSpec], n_layers: int, hidden: int) -> None:
    from klstore.core.steering import load_vector

    for probe in probes:
        if probe.name == "steer" and "vector" in probe.params:
            load_vector(probe.params["vector"], n_layers, hidden)
