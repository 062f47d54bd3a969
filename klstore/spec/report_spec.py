"""Report specs (`klstore report SPEC`, files in reports/): what a report aggregates and draws."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from klstore.errors import KlstoreError
from klstore.spec.messages import Value, checked, fail, validate
from klstore.spec.values import DIVERGENCES, check_label, layer_spec

REPORT_DIMENSIONS = ("model", "probe", "prompt_group")
MIN_RESAMPLES, MAX_RESAMPLES = 100, 100_000  # a report spec's `resamples` (bootstrap intervals)
# a report's `layers` value: each map shows the layers present in the rows it draws
# (klstore.report.aggregate.layers_for); `all` is every layer of the model
STORED_LAYERS = "stored"
# what a report's maps show (its `value:` key, also spelled `divergence:`): a divergence column
# of the kl rows, or q_entropy, the entropy of each row's Q (docs/conventions.md, "Entropy of Q")
REPORT_VALUES: dict[str, str] = {**DIVERGENCES, "q_entropy": "Entropy of Q"}


class ReportSpec(Value):
    """What a report aggregates and draws (see klstore.config for the YAML form)."""

    name: Annotated[str, checked(check_label, "report name")] = "default"
    store: str | None = None
    runs: Any = "latest"  # "latest", None (= all), or a tuple of run ids or names
    models: Any = None  # None (= all) or a tuple of labels
    probes: Any = None
    groups: Any = None
    group_by: Any = (("model", "probe"), ("model", "probe", "prompt_group"))
    aggregate: Literal["mean", "median"] = "mean"
    # colour range of every figure (klstore.report.scale): robust ends it at Q3 + 3 IQR when a
    # value lies beyond, so one outlying layer (Gemma-3's logit-lens layer 0) cannot wash out the rest
    color_scale: Literal["linear", "log", "robust"] = "robust"
    # a layer spec, "stored" (the layers present in the rows a map draws), or JSON {model or "default": spec}
    layers: Any = STORED_LAYERS
    divergence: str = "kl"
    shared_scale: bool = False
    compare_models: bool = True
    compare_groups: bool = True
    per_prompt: int = 2
    # the bootstrap intervals of comparison maps (klstore.report.intervals): their level, the
    # number of resamples and the seed (fixed, so that a rebuild gives the same intervals)
    confidence: float = 0.95
    resamples: int = 2000
    bootstrap_seed: int = 0
    source: str = Field("built-in default", exclude=True)  # the file it came from

    @field_validator("runs", mode="before")
    @classmethod
    def _runs(cls, value):
        return "latest" if value == "latest" else _selection(value, "runs")

    @field_validator("models", "probes", "groups", mode="before")
    @classmethod
    def _names(cls, value, info):
        return _selection(value, info.field_name)

    @field_validator("group_by", mode="before")
    @classmethod
    def _group_by(cls, value):
        if isinstance(value, tuple):
            value = [list(g) for g in value]
        if not isinstance(value, list) or not value:
            raise fail("must be a list of groupings such as [model, probe]")
        groupings = []
        for i, grouping in enumerate(value):
            if isinstance(grouping, str):
                grouping = [grouping]
            if not isinstance(grouping, list) or any(g not in REPORT_DIMENSIONS for g in grouping):
                raise fail(f"[{i}] must list some of {', '.join(REPORT_DIMENSIONS)}, got {grouping!r}")
            groupings.append(tuple(d for d in REPORT_DIMENSIONS if d in grouping))
        return tuple(groupings)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value):
        if isinstance(value, dict):
            for spec in value.values():
                _report_layer_spec(spec)
            return json.dumps({str(k): str(v) for k, v in value.items()}, sort_keys=True)
        if isinstance(value, str) and value.startswith("{"):
            return value  # already normalised
        return _report_layer_spec(value)

    @model_validator(mode="before")
    @classmethod
    def _value_key(cls, data):
        """`value:` is the documented name of what the maps show; `divergence:` its older spelling."""
        if isinstance(data, dict) and "value" in data:
            data = dict(data)
            value = data.pop("value")
            if "divergence" in data and data["divergence"] != value:
                raise fail(f"value {value!r} and divergence {data['divergence']!r} disagree: give one of them")
            data["divergence"] = value
        return data

    @field_validator("divergence")
    @classmethod
    def _divergence(cls, value):
        if value not in REPORT_VALUES:
            raise fail(f"must be {', '.join(list(REPORT_VALUES)[:-1])} or {list(REPORT_VALUES)[-1]}, got {value!r}")
        return value

    @field_validator("per_prompt", mode="before")
    @classmethod
    def _per_prompt(cls, value):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise fail(f"must be a whole number >= 0, got {value!r}")
        return value

    @field_validator("confidence")
    @classmethod
    def _confidence(cls, value):
        if not 0 < value < 1:
            raise fail(f"must be a level between 0 and 1 such as 0.95, got {value!r}")
        return value

    @field_validator("resamples")
    @classmethod
    def _resamples(cls, value):
        if not MIN_RESAMPLES <= value <= MAX_RESAMPLES:
            raise fail(f"must be a whole number from {MIN_RESAMPLES} to {MAX_RESAMPLES}, got {value!r}")
        return value

    @field_validator("bootstrap_seed")
    @classmethod
    def _bootstrap_seed(cls, value):
        if value < 0:
            raise fail(f"must be a whole number >= 0, got {value!r}")
        return value

    def layers_for(self, model: str) -> str:
        """The layer spec that applies to a model."""
        if self.layers.startswith("{"):
            table = json.loads(self.layers)
            return table.get(model, table.get("default", STORED_LAYERS))
        return self.layers

    def describe(self) -> dict:
        """The spec's content (not where it came from or what store it names)."""
        return self.model_dump(exclude={"store"})


def _selection(value, key: str):
    if value == "all" or value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise fail(f"must be 'all' or a list of names, got {value!r}")


def _report_layer_spec(value) -> str:
    if isinstance(value, str) and value.strip().lower() == STORED_LAYERS:
        return STORED_LAYERS
    try:
        return layer_spec(value)
    except PydanticCustomError:
        raise fail(
            "must be a layer spec such as all or 0,15-21,27, stored (the layers in the rows drawn), "
            "or a mapping of model label (or default) to one"
        ) from None


def parse_report_spec(data, where: str = "built-in default") -> ReportSpec:
    """Validate a report spec mapping (unknown keys are errors)."""
    if not isinstance(data, dict):
        raise KlstoreError(f"{where}: a report spec must be a mapping")
    if "source" in data:
        raise KlstoreError(f"{where}: source: unknown key")
    return validate(ReportSpec, {**data, "source": where}, where)
