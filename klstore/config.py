"""Reading experiment configs and report specs from YAML files (the types: klstore.spec).

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

from pathlib import Path

from klstore.spec import (
    ExperimentConfig,
    FitSpec,
    ReportSpec,
    parse_experiment,
    parse_fit,
    parse_report_spec,
    read_yaml,
)


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment config; relative prompt paths resolve against its folder."""
    path = Path(path)
    return parse_experiment(read_yaml(path, "config file") or {}, str(path), base_dir=path.parent)


def load_fit(path: str | Path) -> FitSpec:
    """Read and validate a lens-fit config; a relative corpus path resolves against its folder
    when it does not exist from the working directory."""
    path = Path(path)
    spec = parse_fit(read_yaml(path, "config file") or {}, str(path))
    corpus = Path(spec.corpus.path).expanduser()
    if not corpus.is_absolute() and not corpus.exists() and (path.parent / corpus).exists():
        spec = spec.model_copy(update={"corpus": spec.corpus.model_copy(update={"path": str(path.parent / corpus)})})
    return spec


def load_report_spec(path: str | Path | None) -> ReportSpec:
    """A report spec file, or the built-in default when path is None."""
    if path is None:
        return parse_report_spec({})
    return parse_report_spec(read_yaml(path, "report spec") or {}, str(path))
