"""Experiments: the models of a run (`ModelConfig`), the config file's form (`ExperimentFile`)
and the experiment it describes once its prompt files are read (`ExperimentConfig`, whose
`identity` is hashed into the run id). Reading the files is klstore.config's (`parse_experiment`)."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from klstore.errors import KlstoreError
from klstore.spec.compute import (
    DEFAULT_BATCH_SIZE,
    ComputeOptions,
    ComputeSpec,
    GenerationSpec,
    ProbeSpec,
    Prompt,
    check_patch_sources,
    probe_from_entry,
)
from klstore.spec.messages import Value, checked, fail, rule
from klstore.spec.values import (
    DEFAULT_STORE,
    LayerSpec,
    check_device,
    check_device_map,
    check_divergences,
    check_dtype,
    check_label,
    model_label,
)


class ModelConfig(Value):
    """One model of an experiment: what to load and how many actors of what size."""

    name: str
    label: str = ""
    dtype: Annotated[str, checked(check_dtype)] = "auto"
    device: Annotated[str, checked(check_device)] = "auto"

    num_gpus: float = Field(1.0, ge=0.0)
    num_cpus: float | None = Field(None, gt=0)  # None: 1 with GPUs, else the CPUs shared among actors
    actors: int | None = Field(None, ge=1)  # None: as many as the cluster's resources allow
    trust_remote_code: bool = False
    # Split one model over an actor's devices (accelerate): a strategy or {module: device}.
    # None: "balanced" when the actor has several GPUs (num_gpus > 1), else the whole model on one device.
    device_map: Annotated[Any, checked(check_device_map)] = None  # str | {module: device}
    max_memory: dict[str | int, str | int] | None = None  # per device, e.g. {0: 20GiB, cpu: 64GiB}

    @field_validator("num_gpus")
    @classmethod
    def _whole_above_one(cls, value):
        if value > 1 and value != int(value):  # Ray splits one GPU, never several
            raise fail(f"num_gpus above 1 must be a whole number, got {value:g}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data):
        if isinstance(data, str):
            data = {"name": data}
        if isinstance(data, dict):
            data = dict(data)
            if data.get("num_cpus") == "auto":
                data["num_cpus"] = None
            if "label" not in data and isinstance(data.get("name"), str):  # a name read from a
                data["label"] = model_label(data["name"])  # file has it from config.default_label
        return data

    @field_validator("label")
    @classmethod
    def _label(cls, value):
        return rule(check_label, value, "model label")


class _PromptSource(Value):
    path: str

    @model_validator(mode="before")
    @classmethod
    def _plain(cls, data):
        return {"path": data} if isinstance(data, str) else data


class ExperimentFile(ComputeOptions):
    """An experiment config as written in YAML (see klstore.config for an example); its
    option keys (topk, speed modes, ...) are the compute value's (ComputeOptions).

    A pair with ExperimentConfig that stays: this is the file's form (prompt file paths, the
    compute value's keys side by side, as users write them, so errors name those keys), and
    ExperimentConfig the experiment once the prompt files are read (klstore.config) and the
    compute value is built (`experiment`). Reading files lies between the two."""

    name: Annotated[str, checked(check_label, "run name")] = "run"
    store: str = DEFAULT_STORE
    models: list[ModelConfig] = Field(min_length=1)
    prompts: list[_PromptSource]
    probes: list[Any] = Field(min_length=1)
    layers: LayerSpec = "all"
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    divergences: list[str] = ["kl"]
    shard_size: int = Field(DEFAULT_BATCH_SIZE, ge=1)
    shared_store: bool = False  # a local-folder store that every node of a cluster mounts (NFS, ...)

    @field_validator("generation", mode="before")
    @classmethod
    def _generation(cls, value):
        return {} if value is None else value

    @field_validator("probes")
    @classmethod
    def _probes(cls, value):
        out = []
        for entry in value:
            try:
                out.append(probe_from_entry(entry))
            except KlstoreError as exc:
                raise fail(str(exc)) from None
        return out

    @field_validator("divergences")
    @classmethod
    def _divergences(cls, value):
        return list(rule(check_divergences, value))

    @model_validator(mode="after")
    def _labels(self):
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise fail("models: duplicate model label (set `label:`)")
        return self

    def experiment(self, prompt_paths: tuple[str, ...], prompts: tuple[Prompt, ...], source: str) -> ExperimentConfig:
        """The experiment this file describes, with its prompt files read (`prompts`, from
        `prompt_paths`); `source` names the file in messages."""
        check_patch_sources(self.probes, prompts, f"{source}: probes: ")
        compute = ComputeSpec(
            self.probes,
            self.layers,
            tuple(self.divergences),
            self.generation,
            **{name: getattr(self, name) for name in ComputeOptions.model_fields},
        )
        return ExperimentConfig(
            name=self.name,
            store=self.store,
            models=tuple(self.models),
            prompt_paths=prompt_paths,
            compute=compute,
            shard_size=self.shard_size,
            source=source,
            prompts=prompts,
            shared_store=self.shared_store,
        )


class ExperimentConfig(Value):
    """A validated experiment: models x prompts x probes x layers x divergences."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    name: str
    store: str
    models: tuple[ModelConfig, ...]
    prompt_paths: tuple[str, ...]
    compute: ComputeSpec
    shard_size: int = Field(ge=1)
    source: str = ""  # the file it came from
    prompts: tuple[Prompt, ...] = ()
    shared_store: bool = False  # where the work goes, not what it is: not part of the identity

    # the compute value's core fields, read often enough to be named here too
    @property
    def probes(self) -> tuple[ProbeSpec, ...]:
        return self.compute.probes

    @property
    def layers(self) -> str:
        return self.compute.layers

    @property
    def divergences(self) -> tuple[str, ...]:
        return self.compute.divergences

    @property
    def generation(self) -> GenerationSpec:
        return self.compute.generation

    def identity(self) -> dict:
        """What defines the work (not where it goes): hashed into the run id. The compute
        value's options join it only when not their defaults (ComputeSpec.identity), so run ids
        of stores written before an option existed stay the same."""
        digest = hashlib.sha256()
        for prompt in self.prompts:
            digest.update(f"{prompt.id}\t{prompt.group}\t{prompt.text}\t{prompt.source}\n".encode())
        return {
            **self.compute.identity(),
            "name": self.name,
            "models": [{"name": m.name, "label": m.label, "dtype": m.dtype} for m in self.models],
            "prompts_sha256": digest.hexdigest(),
            "shard_size": self.shard_size,
        }
