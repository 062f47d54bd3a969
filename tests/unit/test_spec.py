"""The ground floor (klstore.spec): every value type's validation and its one-line messages."""

import math

import pytest
import yaml

from klstore.config import check_outputs, default_label, load_config, load_fit, load_report_spec, parse_experiment
from klstore.errors import KlstoreError
from klstore.spec import (
    DIVERGENCES,
    PROBES,
    GenerationSpec,
    ModelConfig,
    ProbeSpec,
    Prompt,
    check_divergences,
    model_label,
    parse_report_spec,
)


def _escape(message: str) -> str:
    return message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")


@pytest.fixture
def config_file(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"id": "q{i}", "text": "prompt {i}"}}\n' for i in range(3)))
    path = tmp_path / "cfg.yaml"
    base = {
        "name": "t",
        "models": [{"name": "m", "label": "tiny"}],
        "prompts": [{"path": "p.jsonl"}],
        "probes": ["logit_lens"],
        "layers": "all",
        "generation": {"max_new_tokens": 2},
    }

    def write(**change):
        path.write_text(yaml.safe_dump({**base, **change}))
        return path

    return write


def test_valid_config_fills_defaults(config_file):
    cfg = load_config(config_file(probes=["logit_lens", {"name": "noise", "scale": 0.5}]))
    assert [p.id for p in cfg.prompts] == ["q0", "q1", "q2"]
    assert cfg.probes[1].params == {"scale": 0.5, "seed": 0}
    assert cfg.models[0].num_cpus is None and cfg.models[0].num_gpus == 1.0
    assert cfg.generation == GenerationSpec(2)
    assert cfg.divergences == ("kl",) and cfg.shard_size == 16


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer": "all"}, "cfg.yaml: layer: unknown key (allowed: clean_pass, divergences, generation"),
        ({"shard_size": "big"}, "cfg.yaml: shard_size must be an integer, got 'big'"),
        ({"shard_size": 0}, "cfg.yaml: shard_size must be at least 1, got 0"),
        ({"shard_size": True}, "cfg.yaml: shard_size must be an integer, got True"),
        ({"topk": -1}, "cfg.yaml: topk must be at least 0, got -1"),
        ({"topk": 101}, "cfg.yaml: topk must be at most 100, got 101"),
        ({"topk": "5"}, "cfg.yaml: topk must be an integer, got '5'"),
        ({"topk": 2.5}, "cfg.yaml: topk must be an integer, got 2.5"),
        ({"clean_pass": "fast"}, "cfg.yaml: clean_pass: unknown clean pass 'fast': choose exact, cached"),
        ({"clean_pass": True}, "cfg.yaml: clean_pass must be a string, got True"),
        ({"clean_pass": None}, "cfg.yaml: clean_pass must be a string, got None"),
        ({"matmul_precision": "bf16"}, "cfg.yaml: matmul_precision: unknown matmul precision 'bf16': choose highest"),
        ({"matmul_precision": 32}, "cfg.yaml: matmul_precision must be a string, got 32"),
        ({"probes": ["lens"]}, "unknown probe 'lens'"),
        ({"probes": []}, "cfg.yaml: probes: empty"),
        ({"divergences": "kl"}, "cfg.yaml: divergences must be a list, got 'kl'"),
        ({"divergences": ["kl", "l2"]}, "unknown divergence 'l2'"),
        ({"generation": {"max_tokens": 3}}, "cfg.yaml: generation.max_tokens: unknown key"),
        ({"generation": {"max_new_tokens": 0}}, "generation.max_new_tokens must be a positive integer, got 0"),
        ({"generation": {"temperature": float("nan")}}, "generation.temperature must be a finite number, got nan"),
        ({"generation": {"temperature": float("inf")}}, "generation.temperature must be a finite number, got inf"),
        ({"generation": {"temperature": 0}}, "generation.temperature must be > 0, got 0"),
        ({"generation": {"seed": 2**64}}, "generation.seed must be < 18446744073709551616"),
        ({"generation": {"do_sample": "yes"}}, "generation.do_sample must be true or false, got 'yes'"),
        ({"models": [{"name": "x", "gpus": 1}]}, "cfg.yaml: models[0].gpus: unknown key"),
        ({"models": [{"name": "x", "actors": 0}]}, "cfg.yaml: models[0].actors must be at least 1, got 0"),
        ({"models": [{"name": "x", "num_gpus": -1}]}, "models[0].num_gpus must be >= 0, got -1"),
        ({"models": [{"name": "x", "num_cpus": 0}]}, "models[0].num_cpus must be > 0, got 0"),
        (
            {"models": [{"name": "x", "device_map": {"model.layers.1": "meta"}}]},
            "models[0].device_map: device_map puts 'model.layers.1' on the meta device",
        ),
        ({"models": [{"name": "x", "device_map": "fast"}]}, "device_map must be one of auto, balanced"),
        (
            {"models": [{"name": "x", "device_map": {"lm_head": "gpu7"}}]},
            "device_map['lm_head'] must be a GPU index, cpu, disk or cuda:N, got 'gpu7'",
        ),
        (
            {"models": [{"name": "x", "device_map": {"lm_head": -1}}]},
            "device_map['lm_head'] must be a GPU index, cpu, disk or cuda:N, got -1",
        ),
        (
            {"models": [{"name": "x", "device_map": {"lm_head": True}}]},
            "device_map['lm_head'] must be a GPU index, cpu, disk or cuda:N, got True",
        ),
        ({"models": [{"label": "x"}]}, "cfg.yaml: models[0].name: missing (required)"),
        ({"models": ["a", "a"]}, "cfg.yaml: models: duplicate model label"),
        ({"models": []}, "cfg.yaml: models: empty"),
        ({"models": [{"name": "x", "label": "../up"}]}, "model label '../up' cannot name a store folder"),
        ({"name": "../up"}, "run name '../up' cannot name a store folder"),
        ({"layers": "1-x"}, "malformed layer spec '1-x'"),
        ({"layers": True}, "layers must be a layer spec such as all or 0,15-21,27"),
        ({"prompts": [{"path": "/nonexistent.jsonl"}]}, "prompts file not found: /nonexistent.jsonl"),
        ({"probes": [{"name": "noise", "scale": -1}]}, "probe noise: scale must be >= 0, got -1"),
        ({"probes": [{"name": "noise", "scale": float("nan")}]}, "probe noise: scale must be a finite number, got nan"),
        ({"probes": [{"name": "noise", "sigma": 1}]}, "probe noise: unknown parameter 'sigma' (allowed: scale, seed)"),
        ({"probes": ["patch"]}, "patch needs a source for every prompt; 3 have none (first: 'q0')"),
    ],
)
def test_config_errors(config_file, change, message):
    with pytest.raises(KlstoreError, match=_escape(message)) as info:
        load_config(config_file(**change))
    assert "\n" not in str(info.value)


def test_config_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(KlstoreError, match="list.yaml: config must be a mapping"):
        load_config(path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(KlstoreError, match=r"list.yaml:2: invalid YAML"):
        load_config(path)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ProbeSpec("lens"), "unknown probe 'lens': choose from logit_lens, skip"),
        (lambda: ProbeSpec("skip", {"scale": 1}), "probe skip: unknown parameter 'scale' (it takes none)"),
        (lambda: ProbeSpec("noise", {"scale": "big"}), "probe noise: scale must be a number, got 'big'"),
        (lambda: ProbeSpec("noise", {"scale": math.inf}), "probe noise: scale must be a finite number, got inf"),
        (lambda: ProbeSpec("noise", {"seed": 1.5}), "probe noise: seed must be an integer, got 1.5"),
        (lambda: ProbeSpec("steer", {"alpha": 1}), "probe steer: give either vector"),
        (lambda: ProbeSpec("steer", {"vector": "v.pt", "positive": "p.jsonl"}), "probe steer: give either vector"),
        (lambda: ProbeSpec("steer", {"positive": "p.jsonl"}), "probe steer: give either vector"),
        (
            lambda: ProbeSpec("steer", {"vector": "v.pt", "alpha": math.nan}),
            "probe steer: alpha must be a finite number",
        ),
        (lambda: GenerationSpec(0), "max_new_tokens must be a positive integer, got 0"),
        (lambda: GenerationSpec(2, temperature=math.nan), "temperature must be a finite number, got nan"),
        (lambda: GenerationSpec(2, seed=2**64), "seed must be < 18446744073709551616"),
        (lambda: Prompt("a", 3), "prompt: text must be a string, got 3"),
        (lambda: check_divergences([]), "no divergence asked for"),
    ],
)
def test_value_errors(build, message):
    with pytest.raises(KlstoreError, match=_escape(message)):
        build()


def test_probe_defaults_and_identity():
    assert ProbeSpec("noise").params == {"scale": 1.0, "seed": 0}
    assert ProbeSpec("steer", {"vector": "v.pt"}).params == {"alpha": 1.0, "vector": "v.pt"}
    assert ProbeSpec("noise", {"scale": 1}).key() == ProbeSpec("noise").key()
    assert ProbeSpec("logit_lens").is_readout and not ProbeSpec("skip").is_readout
    assert set(PROBES) == {"logit_lens", "skip", "ablate_attn", "ablate_mlp", "noise", "steer", "patch"}
    assert list(DIVERGENCES) == ["kl", "kl_reverse", "js"]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"layer": 1}, "s.yaml: layer: unknown key"),
        ({"aggregate": "mode"}, "s.yaml: aggregate must be mean or median, got 'mode'"),
        ({"divergence": "l2"}, "s.yaml: divergence must be kl, kl_reverse, js or q_entropy, got 'l2'"),
        ({"per_prompt": -1}, "s.yaml: per_prompt must be a whole number >= 0, got -1"),
        ({"per_prompt": True}, "s.yaml: per_prompt must be a whole number >= 0, got True"),
        ({"models": 3}, "s.yaml: models must be 'all' or a list of names, got 3"),
        ({"group_by": []}, "group_by must be a list of groupings"),
        ({"group_by": [["layer"]]}, "must list some of model, probe, prompt_group"),
        ({"layers": {"m": "1-x"}}, "layers must be a layer spec"),
        ({"shared_scale": "no"}, "s.yaml: shared_scale must be true or false, got 'no'"),
        ({"name": "a/b"}, "report name 'a/b' cannot name a store folder"),
        ({"source": "x"}, "s.yaml: source: unknown key"),
    ],
)
def test_report_spec_errors(data, message):
    with pytest.raises(KlstoreError, match=_escape(message)):
        parse_report_spec(data, "s.yaml")


def test_report_spec_defaults_and_per_model_layers(tmp_path):
    spec = load_report_spec(None)
    assert spec.runs == "latest" and spec.models is None and spec.per_prompt == 2
    assert spec.group_by == (("model", "probe"), ("model", "probe", "prompt_group"))
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nlayers: {smollm2-135m: '0,15-21', default: all}\ngroup_by: [[probe, model]]\n")
    spec = load_report_spec(path)
    assert spec.layers_for("smollm2-135m") == "0,15-21" and spec.layers_for("other") == "all"
    assert spec.group_by == (("model", "probe"),) and spec.source == str(path)
    assert "source" not in spec.describe() and "store" not in spec.describe()


def test_experiment_identity_is_stable():
    """The run id hashes this dict: its shape must not change (it names existing runs' files)."""
    data = {"name": "x", "models": ["smollm2-135m"], "prompts": [], "probes": ["noise"]}
    cfg = parse_experiment(data)
    assert cfg.identity() == {
        "name": "x",
        "models": [{"name": "smollm2-135m", "label": "smollm2-135m", "dtype": "auto"}],
        "prompts_sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "probes": [{"name": "noise", "scale": 1.0, "seed": 0}],
        "layers": "all",
        "divergences": ["kl"],
        "generation": {"max_new_tokens": 5, "do_sample": False, "seed": 0, "temperature": 1.0, "chat": False},
        "shard_size": 16,
    }
    # topk joins the identity only when it is not the default (older run ids stay valid)
    assert "topk" not in cfg.identity()
    assert parse_experiment({**data, "topk": 0}).identity()["topk"] == 0
    # clean_pass likewise: a cached run is a run of its own, the exact one keeps its id
    assert "clean_pass" not in parse_experiment({**data, "clean_pass": "exact"}).identity()
    assert parse_experiment({**data, "clean_pass": "cached"}).identity()["clean_pass"] == "cached"
    assert "matmul_precision" not in parse_experiment({**data, "matmul_precision": "highest"}).identity()
    assert parse_experiment({**data, "matmul_precision": "medium"}).identity()["matmul_precision"] == "medium"


def test_output_paths_are_checked_where_files_are_read(config_file, tmp_path):
    """A value does not look at the disk (ProbeSpec accepts any vector file name); the reading
    layer checks that steer's `save` can be written, with the messages it always had."""
    sets = {"positive": "p.jsonl", "negative": "p.jsonl"}
    unwritable = ProbeSpec("steer", {**sets, "save": "/proc/v.pt"})
    message = "probe steer: save: cannot be written: folder '/proc' does not exist or is not writable"
    with pytest.raises(KlstoreError, match=_escape(message)):
        check_outputs([unwritable])
    (tmp_path / "d.pt").mkdir()
    with pytest.raises(KlstoreError, match=_escape(f"save: cannot be written: '{tmp_path / 'd.pt'}' is a folder")):
        check_outputs([ProbeSpec("steer", {**sets, "save": str(tmp_path / "d.pt")})])
    check_outputs([ProbeSpec("steer", {**sets, "save": str(tmp_path / "v.pt")}), ProbeSpec("skip")])
    with pytest.raises(KlstoreError, match=_escape(f"cfg.yaml: probes: {message}")):
        load_config(config_file(probes=[{"name": "steer", **sets, "save": "/proc/v.pt"}]))


def test_a_local_owner_name_is_a_path_only_where_files_are_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert model_label("models/tiny") == "models--tiny" and model_label("models/tiny", local=True) == "tiny"
    assert default_label("models/tiny") == "tiny" and default_label("org/name") == "org--name"
    assert ModelConfig(name="org/name").label == "org--name"
    cfg = parse_experiment({"models": ["models/tiny", {"name": "org/name"}], "prompts": [], "probes": ["skip"]})
    assert [m.label for m in cfg.models] == ["tiny", "org--name"]
    (tmp_path / "fit.yaml").write_text("model: models/tiny\nkind: least_squares\ncorpus: {path: c.jsonl}\n")
    assert load_fit(tmp_path / "fit.yaml").model.label == "tiny"


def test_values_built_in_code_raise_one_line_and_nested_values_keep_their_key_path():
    with pytest.raises(KlstoreError, match=_escape("dtype: unknown dtype 'q'")):
        ModelConfig(name="x", dtype="q")
    from klstore.spec import ComputeSpec

    with pytest.raises(KlstoreError, match=_escape("generation.max_new_tokens must be a positive integer, got 0")):
        ComputeSpec(generation={"max_new_tokens": 0})
    assert ComputeSpec(generation={"max_new_tokens": 3}).generation == GenerationSpec(3)
