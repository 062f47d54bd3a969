"""The ground floor: every value type of klstore and its validation, and no file I/O.

Prompts, generation settings, probes and their parameters, lenses, the compute value,
divergence names, labels and run names, layer-spec syntax, experiment configs, lens fits and
report specs. Each is declared once as a pydantic model (`extra="forbid"`, strict types, no
NaN or infinity), and one function, `messages.describe`, turns any validation failure into the
one-line message users see:

    <where>: <key path> must be <what>, got <value>
    <where>: <key path>: unknown key (allowed: ...)

By subject (each module imports only those above it):

    messages     the base `Value`, `validate`, and how failures become one line
    values       names and plain checks: labels, dtypes, devices, options, divergences, layer specs
    compute      Prompt, GenerationSpec, ProbeSpec, LensSpec, ComputeSpec (what to compute)
    experiment   ModelConfig, the config file's form and the ExperimentConfig it describes
    fit          lens-fit configs (FitSpec and its recipes)
    report_spec  report specs (ReportSpec)

Every public name is importable from `klstore.spec` itself. Nothing here reads, writes or
looks at a file (tests/unit/test_architecture.py checks it): files are read, and output paths
checked, one layer up in klstore.config. This package imports neither torch, transformers,
ray, duckdb nor pyarrow: everything else in klstore imports down to it.
"""

from klstore.spec.compute import (
    DEFAULT_BATCH_SIZE,
    LENS_ID_LENGTH,
    LENS_READOUTS,
    LOGIT_LENS,
    LOGIT_LENS_ID,
    PROBES,
    READOUTS,
    VECTOR_SUFFIXES,
    ComputeOptions,
    ComputeSpec,
    GenerationSpec,
    LensSpec,
    Option,
    ProbeSpec,
    Prompt,
    check_lens,
    check_patch_sources,
    is_lens_id,
    parse_prompt,
    probe_from_entry,
)
from klstore.spec.experiment import ExperimentConfig, ExperimentFile, ModelConfig
from klstore.spec.fit import FIT_KINDS, CorpusSpec, FitSpec, JacobianRecipe, TunedRecipe, parse_fit
from klstore.spec.messages import Value, validate
from klstore.spec.report_spec import (
    MAX_RESAMPLES,
    MIN_RESAMPLES,
    REPORT_DIMENSIONS,
    REPORT_VALUES,
    STORED_LAYERS,
    ReportSpec,
    parse_report_spec,
)
from klstore.spec.values import (
    CLEAN_PASSES,
    DEFAULT_CLEAN_PASS,
    DEFAULT_MATMUL_PRECISION,
    DEFAULT_STORE,
    DEFAULT_TOPK,
    DEVICE_MAP_STRATEGIES,
    DIVERGENCES,
    DTYPES,
    MATMUL_PRECISIONS,
    MAX_TOPK,
    SPEED_MODES,
    LayerSpec,
    check_clean_pass,
    check_device,
    check_device_map,
    check_divergences,
    check_dtype,
    check_label,
    check_matmul_precision,
    check_topk,
    model_label,
    parse_layers,
)

__all__ = [
    "CLEAN_PASSES",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CLEAN_PASS",
    "DEFAULT_MATMUL_PRECISION",
    "DEFAULT_STORE",
    "DEFAULT_TOPK",
    "DEVICE_MAP_STRATEGIES",
    "DIVERGENCES",
    "DTYPES",
    "FIT_KINDS",
    "LENS_ID_LENGTH",
    "LENS_READOUTS",
    "LOGIT_LENS",
    "LOGIT_LENS_ID",
    "MATMUL_PRECISIONS",
    "MAX_RESAMPLES",
    "MAX_TOPK",
    "MIN_RESAMPLES",
    "PROBES",
    "READOUTS",
    "REPORT_DIMENSIONS",
    "REPORT_VALUES",
    "SPEED_MODES",
    "STORED_LAYERS",
    "VECTOR_SUFFIXES",
    "ComputeOptions",
    "ComputeSpec",
    "CorpusSpec",
    "ExperimentConfig",
    "ExperimentFile",
    "FitSpec",
    "GenerationSpec",
    "JacobianRecipe",
    "LayerSpec",
    "LensSpec",
    "ModelConfig",
    "Option",
    "ProbeSpec",
    "Prompt",
    "ReportSpec",
    "TunedRecipe",
    "Value",
    "check_clean_pass",
    "check_device",
    "check_device_map",
    "check_divergences",
    "check_dtype",
    "check_label",
    "check_lens",
    "check_matmul_precision",
    "check_patch_sources",
    "check_topk",
    "is_lens_id",
    "model_label",
    "parse_fit",
    "parse_layers",
    "parse_prompt",
    "parse_report_spec",
    "probe_from_entry",
    "validate",
]
