"""The compute value (spec.ComputeSpec): one default and one validator per field, taken whole by
the config, the run plan, the engine, the API and the CLI; run identity derived from it."""

import json

import pytest

from klstore.cli import main
from klstore.errors import KlstoreError
from klstore.run.plan import run_id_for
from klstore.spec import (
    DEFAULT_TOPK,
    ComputeSpec,
    ExperimentConfig,
    GenerationSpec,
    ModelConfig,
    Option,
    ProbeSpec,
    Prompt,
)
from klstore.store import views


def _config(compute, name="r"):
    return ExperimentConfig(
        name=name,
        store="/tmp/unused",
        models=(ModelConfig(name="tiny", label="tiny"),),
        prompt_paths=(),
        compute=compute,
        shard_size=16,
        prompts=(Prompt("a", "hello"),),
    )


def test_identity_is_the_one_written_before_the_compute_value():
    """Run ids of stores written before ComputeSpec stay valid: the identity dict is the old one."""
    probes = (ProbeSpec("logit_lens"), ProbeSpec("noise", {"scale": 2.0}))
    cfg = _config(ComputeSpec(probes, "0,2", ("kl", "js"), GenerationSpec(3)))
    old = {
        "name": "r",
        "models": [{"name": "tiny", "label": "tiny", "dtype": "auto"}],
        "prompts_sha256": cfg.identity()["prompts_sha256"],
        "probes": [{"name": "logit_lens"}, {"name": "noise", "scale": 2.0, "seed": 0}],
        "layers": "0,2",
        "divergences": ["kl", "js"],
        "generation": GenerationSpec(3).model_dump(),
        "shard_size": 16,
    }
    assert cfg.identity() == old
    fast = _config(ComputeSpec(probes, "0,2", ("kl", "js"), GenerationSpec(3), topk=0, clean_pass="cached"))
    assert fast.identity() == {**old, "topk": 0, "clean_pass": "cached"}
    batched = _config(ComputeSpec(probes, "0,2", ("kl", "js"), GenerationSpec(3), batch_size=3))
    assert batched.identity() == old  # batch size moves values by rounding only: not identity


@pytest.mark.parametrize(
    "options, message",
    [
        ({"topk": 101}, "topk must be an integer from 0 to 100, got 101"),
        ({"clean_pass": "fast"}, "unknown clean pass 'fast': choose exact, cached"),
        ({"matmul_precision": "tf32"}, "unknown matmul precision 'tf32': choose highest, high, medium"),
        ({"lense": "tuned"}, "unknown option 'lense'"),
    ],
)
def test_options_checked_once(options, message):
    with pytest.raises(KlstoreError, match=message):
        ComputeSpec.check_options(options)


def test_one_default_per_field():
    value = ComputeSpec()
    assert value.topk == DEFAULT_TOPK and value.probes == (ProbeSpec("logit_lens"),)
    assert value.layers == "all" and value.divergences == ("kl",) and value.generation == GenerationSpec()
    with pytest.raises(KlstoreError, match="layer"):
        ComputeSpec(layers="0-")


class WithProbeDtype(ComputeSpec):
    """A test-only field, added as a real one would be: nothing else is edited."""

    probe_dtype: str = "float32"

    @classmethod
    def options(cls):
        info = cls.model_fields["probe_dtype"]
        return {**super().options(), "probe_dtype": (info, Option("--probe-dtype", "D", "the dtype of a probe's pass"))}


def test_a_new_field_reaches_the_engine_the_identity_and_the_cli(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import klstore.core.engine as engine
    import klstore.spec as spec

    seen = []
    original = engine.Engine.compute
    monkeypatch.setattr(
        engine.Engine,
        "compute",
        lambda self, prompts, value, *a, **k: seen.append(value) or original(self, prompts, value, *a, **k),
    )
    monkeypatch.setattr(spec, "ComputeSpec", WithProbeDtype)  # what the CLI builds its flags and value from
    store = str(tmp_path / "store")
    base = ["compute", "--model", str(tiny_model_dir), "--prompt", "hello there", "-n", "2", "--store", store]
    assert main(base) == 0
    assert main([*base, "--probe-dtype", "float64"]) == 0
    capsys.readouterr()
    assert [v.probe_dtype for v in seen if isinstance(v, WithProbeDtype) and v.batch_size > 1] == ["float32", "float64"]
    _, runs = views.sql(store, "SELECT run_id, config FROM runs ORDER BY created_at")
    assert len(runs) == 2
    default_run, dtype_run = (json.loads(config) for _, config in runs)
    assert "probe_dtype" not in default_run and dtype_run["probe_dtype"] == "float64"
    # the default run's id is the one ComputeSpec itself gives: a new field at its default changes no id
    plain = {k: v for k, v in default_run.items() if k not in ("store", "source")}
    assert runs[0][0] == run_id_for(plain)
    monkeypatch.undo()
    assert "--probe-dtype" not in " ".join(o.flag or "" for _, o in ComputeSpec.options().values())
