"""The checks made before any work, the same for `klstore run` (before it joins Ray) and
`klstore compute` (before the model loads): everything about an experiment that a model's
config and tokenizer can tell without its weights.

Per model (a local model: built-in, folder or .gguf file; a hub id is checked after its load,
by the same functions):
- the layers against its depth;
- each `steer` vector file against its depth and hidden size;
- each prompt against its tokenizer: not empty, and its tokens plus `max_new_tokens` within
  the context (`core.engine.encode_prompt`, which the engine itself uses).
"""

from __future__ import annotations

from klstore.errors import KlstoreError
from klstore.spec import ExperimentConfig, GenerationSpec, ProbeSpec, parse_layers


def check_experiment(cfg: ExperimentConfig) -> None:
    """`check_model` for every model of an experiment (`klstore run`, before Ray starts)."""
    for model in cfg.models:
        check_model(model.name, model.label, cfg.layers, cfg.probes, cfg.generation, cfg.prompts,
                    model.trust_remote_code)


def check_model(name: str, label: str, layers: str, probes, generation: GenerationSpec, prompts,
                trust_remote_code: bool = False) -> None:
    """Raise the first KlstoreError this model would raise on this work, before its weights load
    (`label` names it in messages). A hub id is not read here: its load checks the same."""
    from klstore.core.engine import encode_prompt
    from klstore.core.models import read_shape, read_tokenizer

    shape = read_shape(name, trust_remote_code)
    if shape is None:
        return
    parse_layers(layers, shape.n_layers, label)
    if shape.hidden_size:
        _check_vectors(probes, shape.n_layers, shape.hidden_size)
    try:
        tokenizer = read_tokenizer(name, trust_remote_code) if prompts else None
    except KlstoreError:
        return  # no tokenizer to read here: the model's load names it, as for a hub id
    for prompt in prompts:
        encode_prompt(tokenizer, prompt, generation, shape.context_length, label)


def _check_vectors(probes: tuple[ProbeSpec, ...] | list[ProbeSpec], n_layers: int, hidden: int) -> None:
    from klstore.core.steering import load_vector

    for probe in probes:
        if probe.name == "steer" and "vector" in probe.params:
            load_vector(probe.params["vector"], n_layers, hidden)
