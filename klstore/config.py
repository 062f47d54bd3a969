"""The reading layer: every file on the way from user input to klstore.spec's values.

YAML configs (experiments, lens fits) and report specs, JSON Lines prompt files and UTF-8 text
are read here, and the paths klstore will write (figures, steering vectors, reports, stores)
are checked here before work starts; the values and their validation (klstore.spec) touch no
file. A file's errors name it, and the line where there is one, in one KlstoreError.
Steering vectors and lens folders need torch and are read in klstore.core (steering, lenses).

An experiment config (`klstore run CONFIG`):

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
    shared_store: false            # true: a local-folder store every node of a cluster mounts (NFS)

A report spec (`klstore report SPEC`, files in reports/):

    name: default
    store: ./klstore-data        # optional; `klstore report --store` overrides
    runs: latest                 # each model's newest run; all; or a list of run ids or run names
    models: all                  # or a list of model labels
    probes: all                  # or a list
    groups: all                  # or a list of prompt groups
    group_by:                    # one section of figures per grouping
      - [model, probe]
      - [model, probe, prompt_group]
    aggregate: mean              # or median
    layers: all                  # layer spec, e.g. 0,15-21,27 (negative = from each model's end),
                                 # or per model: {smollm2-135m: "0,15-21,27", default: all}
    value: kl                    # what the maps show: kl, kl_reverse, js, or q_entropy (the entropy of
                             # each layer's Q, docs/conventions.md); `divergence:` is the same key
    shared_scale: false          # one colour scale for all figures of a section
    compare_models: true         # model-vs-model difference heatmaps (by relative depth if needed)
    compare_groups: true         # group-vs-group difference heatmaps
    per_prompt: 2                # per-prompt heatmaps (token texts on x) per model and probe
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from klstore.errors import KlstoreError
from klstore.spec import (
    ExperimentConfig,
    ExperimentFile,
    FitSpec,
    ProbeSpec,
    Prompt,
    ReportSpec,
    model_label,
    parse_fit,
    parse_prompt,
    parse_report_spec,
    validate,
)


# ------------------------------------------------------------------ reading files
def read_text(path: Path, what: str, kind: str) -> str:
    """A UTF-8 text file (`what`: e.g. "prompts file", `kind`: e.g. "JSON Lines"); a missing,
    unreadable, non-UTF-8 or folder path is one KlstoreError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KlstoreError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise KlstoreError(f"{what} {path} is a folder, not a {kind} file") from None
    except UnicodeDecodeError as exc:
        raise KlstoreError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise KlstoreError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_yaml(path: str | Path, what: str):
    """A YAML file's data; a missing file or invalid YAML is a KlstoreError naming file and line."""
    import yaml

    path = Path(path)
    text = read_text(path, what, "YAML")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise KlstoreError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None


def read_prompts(path: str | Path) -> list[Prompt]:
    """Read and validate a JSON Lines prompt file; errors name the file and line."""
    path = Path(path)
    lines = read_text(path, "prompts file", "JSON Lines").splitlines()
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KlstoreError(f"{where}: invalid JSON ({exc.msg})") from None
        prompt = parse_prompt(record, where)
        if prompt.id in seen:
            raise KlstoreError(f"{where}: duplicate id {prompt.id!r} (first on line {seen[prompt.id]})")
        seen[prompt.id] = number
        prompts.append(prompt)
    if not prompts:
        raise KlstoreError(f"{path}: no prompts")
    return prompts


# ---------------------------------------------------------------- paths and labels
def write_problem(folder: str | Path) -> str | None:
    """Why a file cannot be created in `folder` ('does not exist', 'not writable: <reason>'),
    or None. It creates and removes a file there: os.access says yes to root on read-only
    mounts and on /proc, where creating a file fails. Every path klstore writes (figures,
    vectors, reports, stores) is checked with it before work starts."""
    import tempfile

    if not os.path.isdir(folder):
        return "does not exist"
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".klstore-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        return f"is not writable ({exc.strerror or exc})"
    return None


def check_outputs(probes: list[ProbeSpec] | tuple[ProbeSpec, ...], where: str = "") -> None:
    """The files the probes will write (steer's `save`) can be created; else one KlstoreError
    (`where`: a config's "file: probes: "). Called where probes come in: the config, `compute`,
    `Lens.compute`."""
    for probe in probes:
        save = probe.params.get("save")
        if save is None:
            continue
        if os.path.isdir(save):
            problem = f"{save!r} is a folder"
        else:
            folder = os.path.dirname(save) or "."
            if write_problem(folder) is None:
                continue
            problem = f"folder {folder!r} does not exist or is not writable"
        raise KlstoreError(f"{where}probe {probe.name}: save: cannot be written: {problem}")


def default_label(model_name: str) -> str:
    """The store label of a model given without one (spec.model_label): an `owner/name` that is
    a local file or folder is a path, else a hub id."""
    return model_label(model_name, local=os.path.exists(model_name))


def _with_label(entry):
    """A config's model entry (a name, or a mapping with `name`) with its default label filled
    in, so that ModelConfig's validation (which looks at no file) gets the file system's answer."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if isinstance(entry, dict) and "label" not in entry and isinstance(entry.get("name"), str):
        entry = {**entry, "label": default_label(entry["name"])}
    return entry


# ------------------------------------------------------------ configs and specs
def parse_experiment(data, source: str = "config", base_dir: Path | None = None) -> ExperimentConfig:
    """Validate a config mapping and read its prompt files (relative to base_dir, else the cwd)."""
    if not isinstance(data, dict):
        raise KlstoreError(f"{source}: config must be a mapping")
    if isinstance(data.get("models"), list):
        data = {**data, "models": [_with_label(entry) for entry in data["models"]]}
    raw = validate(ExperimentFile, data, source)
    check_outputs(raw.probes, f"{source}: probes: ")
    paths: list[str] = []
    prompts: list[Prompt] = []
    seen: dict[str, str] = {}  # prompt id -> the file it came from
    for entry in raw.prompts:
        path = Path(entry.path)
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = base_dir / path
        for prompt in read_prompts(path):
            if prompt.id in seen:
                raise KlstoreError(f"{path}: duplicate id {prompt.id!r} (also in {seen[prompt.id]})")
            seen[prompt.id] = str(path)
            prompts.append(prompt)
        paths.append(str(path))
    return raw.experiment(tuple(paths), tuple(prompts), source)


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment config; relative prompt paths resolve against its folder."""
    path = Path(path)
    return parse_experiment(read_yaml(path, "config file") or {}, str(path), base_dir=path.parent)


def load_fit(path: str | Path) -> FitSpec:
    """Read and validate a lens-fit config; a relative corpus path resolves against its folder
    when it does not exist from the working directory."""
    path = Path(path)
    data = read_yaml(path, "config file") or {}
    if isinstance(data, dict) and "model" in data:
        data = {**data, "model": _with_label(data["model"])}
    spec = parse_fit(data, str(path))
    corpus = Path(spec.corpus.path).expanduser()
    if not corpus.is_absolute() and not corpus.exists() and (path.parent / corpus).exists():
        spec = spec.model_copy(update={"corpus": spec.corpus.model_copy(update={"path": str(path.parent / corpus)})})
    return spec


def load_report_spec(path: str | Path | None) -> ReportSpec:
    """A report spec file, or the built-in default when path is None."""
    if path is None:
        return parse_report_spec({})
    return parse_report_spec(read_yaml(path, "report spec") or {}, str(path))
