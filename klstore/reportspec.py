"""Report specs (YAML in reports/): what to aggregate and draw. Unknown keys are errors.

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
    divergence: kl               # kl, kl_reverse or js
    shared_scale: false          # one colour scale for all figures of a section
    compare_models: true         # model-vs-model difference heatmaps (by relative depth if needed)
    compare_groups: true         # group-vs-group difference heatmaps
    per_prompt: 2                # per-prompt heatmaps (token texts on x) per model and probe
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from klstore.errors import KlstoreError

DIMENSIONS = ("model", "probe", "prompt_group")
DEFAULT = {
    "name": "default", "runs": "latest", "models": "all", "probes": "all", "groups": "all",
    "group_by": [["model", "probe"], ["model", "probe", "prompt_group"]],
    "aggregate": "mean", "layers": "all", "divergence": "kl", "shared_scale": False,
    "compare_models": True, "compare_groups": True, "per_prompt": 2,
}


@dataclass(frozen=True)
class ReportSpec:
    name: str
    store: str | None
    runs: tuple[str, ...] | str | None  # None = all, "latest" = each model's newest run
    models: tuple[str, ...] | None
    probes: tuple[str, ...] | None
    groups: tuple[str, ...] | None
    group_by: tuple[tuple[str, ...], ...]
    aggregate: str
    layers: str  # a layer spec, or JSON {model or "default": spec}
    divergence: str
    shared_scale: bool
    compare_models: bool
    compare_groups: bool
    per_prompt: int
    source: str = "built-in default"

    def layers_for(self, model: str) -> str:
        """The layer spec that applies to a model."""
        if self.layers.startswith("{"):
            table = json.loads(self.layers)
            return table.get(model, table.get("default", "all"))
        return self.layers

    def describe(self) -> dict:
        from dataclasses import asdict

        return {k: v for k, v in asdict(self).items() if k not in ("store", "source")}


def _selection(value, key: str, where: str):
    if value == "all" or value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value) and value:
        return tuple(value)
    raise KlstoreError(f"{where}: {key} must be 'all' or a list of names, got {value!r}")


def parse(data: dict, where: str = "built-in default") -> ReportSpec:
    from klstore.layerspec import parse_layers
    from klstore.store import check_label

    if not isinstance(data, dict):
        raise KlstoreError(f"{where}: a report spec must be a mapping")
    allowed = set(DEFAULT) | {"store"}
    for key in data:
        if key not in allowed:
            raise KlstoreError(f"{where}: {key}: unknown key (allowed: {', '.join(sorted(allowed))})")
    merged = {**DEFAULT, **data}
    name = merged["name"]
    if not isinstance(name, str):
        raise KlstoreError(f"{where}: name must be a string, got {name!r}")
    check_label(name, "report name")
    store = merged.get("store")
    if store is not None and not isinstance(store, str):
        raise KlstoreError(f"{where}: store must be a string, got {store!r}")
    group_by = merged["group_by"]
    if not isinstance(group_by, list) or not group_by:
        raise KlstoreError(f"{where}: group_by must be a list of groupings such as [model, probe]")
    groupings = []
    for i, grouping in enumerate(group_by):
        if isinstance(grouping, str):
            grouping = [grouping]
        if not isinstance(grouping, list) or any(g not in DIMENSIONS for g in grouping):
            raise KlstoreError(f"{where}: group_by[{i}] must list some of {', '.join(DIMENSIONS)}, "
                               f"got {grouping!r}")
        groupings.append(tuple(d for d in DIMENSIONS if d in grouping))
    if merged["aggregate"] not in ("mean", "median"):
        raise KlstoreError(f"{where}: aggregate must be mean or median, got {merged['aggregate']!r}")
    if merged["divergence"] not in ("kl", "kl_reverse", "js"):
        raise KlstoreError(f"{where}: divergence must be kl, kl_reverse or js, got {merged['divergence']!r}")
    layers = merged["layers"]
    per_model = layers if isinstance(layers, dict) else {"default": layers}
    for model, value in per_model.items():
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise KlstoreError(f"{where}: layers must be a layer spec such as all or 0,15-21,27, "
                               f"or a mapping of model label (or default) to one")
        parse_layers(str(value), 10**6)
    layers = str(layers) if not isinstance(layers, dict) else json.dumps(
        {str(k): str(v) for k, v in layers.items()}, sort_keys=True)
    for key in ("shared_scale", "compare_models", "compare_groups"):
        if not isinstance(merged[key], bool):
            raise KlstoreError(f"{where}: {key} must be true or false, got {merged[key]!r}")
    per_prompt = merged["per_prompt"]
    if not isinstance(per_prompt, int) or isinstance(per_prompt, bool) or per_prompt < 0:
        raise KlstoreError(f"{where}: per_prompt must be a whole number >= 0, got {per_prompt!r}")
    return ReportSpec(
        name=name, store=store,
        runs="latest" if merged["runs"] == "latest" else _selection(merged["runs"], "runs", where), models=_selection(merged["models"], "models", where),
        probes=_selection(merged["probes"], "probes", where), groups=_selection(merged["groups"], "groups", where),
        group_by=tuple(groupings), aggregate=merged["aggregate"], layers=layers,
        divergence=merged["divergence"], shared_scale=merged["shared_scale"],
        compare_models=merged["compare_models"], compare_groups=merged["compare_groups"],
        per_prompt=per_prompt, source=where)


def load(path: str | Path | None) -> ReportSpec:
    """A spec file, or the built-in default when path is None."""
    if path is None:
        return parse({})
    from klstore.config import read_yaml

    return parse(read_yaml(path, "report spec") or {}, str(path))
