"""Experiment configs (YAML) -> validated, frozen objects. Unknown keys and wrong types are errors.

    name: demo
    store: ./klstore-data          # or s3://bucket/prefix; `klstore run --store` overrides it
    models:
      - name: smollm2-135m         # built-in name, Hugging Face repo id, folder or .gguf file
        dtype: auto
        num_gpus: 1                # per actor; fractional packs small models; ignored without GPUs
    prompts:
      - path: jobs/prompts/demo.jsonl
    probes:
      - logit_lens
      - {name: skip}
    layers: all
    generation: {max_new_tokens: 5}
    divergences: [kl, js]
    shard_size: 16
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from klstore.errors import KlstoreError

_TOP_KEYS = {"name", "store", "models", "prompts", "probes", "layers", "generation",
             "divergences", "shard_size"}
_MODEL_KEYS = {"name", "label", "dtype", "device", "num_gpus", "num_cpus", "actors", "trust_remote_code"}
_PROMPT_KEYS = {"path"}
_GEN_KEYS = {"max_new_tokens", "do_sample", "seed", "temperature", "chat"}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    label: str
    dtype: str = "auto"
    device: str = "auto"
    num_gpus: float = 1.0
    num_cpus: float | None = None  # None: 1 with GPUs, else the CPUs divided among all actors
    actors: int | None = None  # None: as many as the cluster's resources allow
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    store: str
    models: tuple[ModelConfig, ...]
    prompt_paths: tuple[str, ...]
    probes: tuple  # ProbeSpec
    layers: str
    generation: object  # GenerationSpec
    divergences: tuple[str, ...]
    shard_size: int
    source: str = ""  # the file it came from
    prompts: tuple = field(default=(), compare=False)  # loaded Prompt objects

    def identity(self) -> dict:
        """What defines the work (not where it goes): hashed into the run id."""
        from dataclasses import asdict

        digest = hashlib.sha256()
        for prompt in self.prompts:
            digest.update(f"{prompt.id}\t{prompt.group}\t{prompt.text}\t{prompt.source}\n".encode())
        return {
            "name": self.name,
            "models": [{"name": m.name, "label": m.label, "dtype": m.dtype} for m in self.models],
            "prompts_sha256": digest.hexdigest(),
            "probes": [{"name": p.name, **p.params} for p in self.probes],
            "layers": self.layers, "divergences": list(self.divergences),
            "generation": asdict(self.generation), "shard_size": self.shard_size,
        }


def _where(source: str, key: str) -> str:
    return f"{source}: {key}"


def _check_keys(mapping, allowed: set[str], source: str, prefix: str) -> None:
    if not isinstance(mapping, dict):
        raise KlstoreError(f"{_where(source, prefix or 'config')} must be a mapping")
    for key in mapping:
        if key not in allowed:
            raise KlstoreError(f"{_where(source, prefix + str(key))}: unknown key "
                               f"(allowed: {', '.join(sorted(allowed))})")


def _entry(entry, main_key: str, allowed: set[str], source: str, prefix: str) -> dict:
    """A list entry given as a plain string (its `main_key`) or as a mapping with that key."""
    if isinstance(entry, str):
        entry = {main_key: entry}
    _check_keys(entry, allowed, source, prefix)
    if main_key not in entry:
        raise KlstoreError(f"{_where(source, prefix + main_key)}: missing (required)")
    return entry


def _typed(value, types, source: str, key: str, what: str):
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise KlstoreError(f"{_where(source, key)} must be {what}, got {value!r}")
    if not isinstance(value, types):
        raise KlstoreError(f"{_where(source, key)} must be {what}, got {value!r}")
    return value


def parse(data, source: str = "config", base_dir: Path | None = None) -> ExperimentConfig:
    """Validate a config mapping; relative prompt paths resolve against base_dir (else the cwd)."""
    from klstore import divergence
    from klstore.engine import GenerationSpec
    from klstore.probes import ProbeSpec
    from klstore.prompts import load_prompts
    from klstore.store import DEFAULT_STORE, check_label, model_label

    _check_keys(data, _TOP_KEYS, source, "")
    for required in ("models", "prompts", "probes"):
        if required not in data:
            raise KlstoreError(f"{_where(source, required)}: missing (required)")
    name = check_label(_typed(data.get("name", "run"), str, source, "name", "a string"), "run name")
    store = _typed(data.get("store", DEFAULT_STORE), str, source, "store", "a string")

    models = []
    for i, entry in enumerate(_typed(data["models"], list, source, "models", "a list")):
        key = f"models[{i}]."
        entry = _entry(entry, "name", _MODEL_KEYS, source, key)
        model_name = _typed(entry["name"], str, source, key + "name", "a string")
        label = check_label(_typed(entry.get("label", model_label(model_name)), str, source,
                                   key + "label", "a string"), "model label")
        actors = entry.get("actors")
        if actors is not None and (_typed(actors, int, source, key + "actors", "an integer") < 1):
            raise KlstoreError(f"{_where(source, key + 'actors')} must be at least 1, got {actors}")
        num_gpus = _typed(entry.get("num_gpus", 1), (int, float), source, key + "num_gpus", "a number")
        num_cpus = entry.get("num_cpus", "auto")
        if num_cpus != "auto":
            _typed(num_cpus, (int, float), source, key + "num_cpus", "a number or auto")
        if num_gpus < 0 or (num_cpus != "auto" and num_cpus <= 0):
            raise KlstoreError(f"{_where(source, key + 'num_gpus/num_cpus')} must be positive")
        models.append(ModelConfig(
            name=model_name, label=label,
            dtype=_typed(entry.get("dtype", "auto"), str, source, key + "dtype", "a string"),
            device=_typed(entry.get("device", "auto"), str, source, key + "device", "a string"),
            num_gpus=float(num_gpus), num_cpus=None if num_cpus == "auto" else float(num_cpus), actors=actors,
            trust_remote_code=_typed(entry.get("trust_remote_code", False), bool, source,
                                     key + "trust_remote_code", "true or false")))
    if not models:
        raise KlstoreError(f"{_where(source, 'models')}: empty")
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise KlstoreError(f"{_where(source, 'models')}: duplicate model label (set `label:`)")

    paths, prompts, seen = [], [], {}
    for i, entry in enumerate(_typed(data["prompts"], list, source, "prompts", "a list")):
        key = f"prompts[{i}]."
        entry = _entry(entry, "path", _PROMPT_KEYS, source, key)
        path = Path(_typed(entry["path"], str, source, key + "path", "a string"))
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = base_dir / path
        for prompt in load_prompts(path):
            if prompt.id in seen:
                raise KlstoreError(f"{path}: duplicate id {prompt.id!r} (also in {seen[prompt.id]})")
            seen[prompt.id] = str(path)
            prompts.append(prompt)
        paths.append(str(path))

    probes = []
    for i, entry in enumerate(_typed(data["probes"], list, source, "probes", "a list")):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            raise KlstoreError(f"{_where(source, f'probes[{i}]')}: a probe name or {{name: ..., ...}}")
        params = {k: v for k, v in entry.items() if k != "name"}
        probes.append(ProbeSpec(entry["name"], params))
    if not probes:
        raise KlstoreError(f"{_where(source, 'probes')}: empty")
    if any(p.name == "patch" for p in probes):
        missing = [p.id for p in prompts if not p.source]
        if missing:
            raise KlstoreError(f"{_where(source, 'probes')}: patch needs a source for every prompt; "
                               f"{len(missing)} have none (first: {missing[0]!r})")

    layers = data.get("layers", "all")
    layers = str(layers) if isinstance(layers, (int, str)) and not isinstance(layers, bool) else None
    if layers is None:
        raise KlstoreError(f"{_where(source, 'layers')} must be a layer spec such as all or 0,15-21,27")
    from klstore.layerspec import parse_layers

    parse_layers(layers, 10**6)  # syntax; the range is checked per model

    gen = data.get("generation", {}) or {}
    _check_keys(gen, _GEN_KEYS, source, "generation.")
    generation = GenerationSpec(
        max_new_tokens=_typed(gen.get("max_new_tokens", 5), int, source, "generation.max_new_tokens", "an integer"),
        do_sample=_typed(gen.get("do_sample", False), bool, source, "generation.do_sample", "true or false"),
        seed=_typed(gen.get("seed", 0), int, source, "generation.seed", "an integer"),
        temperature=float(_typed(gen.get("temperature", 1.0), (int, float), source, "generation.temperature", "a number")),
        chat=_typed(gen.get("chat", False), bool, source, "generation.chat", "true or false"))
    divergences = divergence.check_names(
        _typed(data.get("divergences", ["kl"]), list, source, "divergences", "a list"))
    shard_size = _typed(data.get("shard_size", 16), int, source, "shard_size", "an integer")
    if shard_size < 1:
        raise KlstoreError(f"{_where(source, 'shard_size')} must be at least 1, got {shard_size}")
    return ExperimentConfig(name, store, tuple(models), tuple(paths), tuple(probes), layers,
                            generation, divergences, shard_size, source, tuple(prompts))


def read_yaml(path: str | Path, what: str):
    """A YAML file's data; a missing file or invalid YAML is a KlstoreError naming file and line."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KlstoreError(f"{what} not found: {path}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise KlstoreError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None


def load(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML config file."""
    path = Path(path)
    return parse(read_yaml(path, "config file") or {}, str(path), base_dir=path.parent)
