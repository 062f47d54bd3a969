"""Hostile input and faults, class by class (issue 10): one line, exit 2, no traceback, and a
store that is byte-identical before and after."""

import hashlib
import json
import os
import time

import pytest
import torch
import yaml
from conftest import kill_when_seen, run_cli

from klstore.cli import main
from klstore.config import load_config
from klstore.errors import KlstoreError
from klstore.run import runner
from klstore.store import views

pytestmark = pytest.mark.real_model


def _checksums(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                out[os.path.join(folder, name)] = hashlib.sha256(handle.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def seeded_store(tmp_path_factory, tiny_model_dir):
    """A store with one small run in it: bad input must leave it byte-identical."""
    root = tmp_path_factory.mktemp("hostile") / "store"
    out = run_cli(
        "compute",
        "--model",
        tiny_model_dir,
        "--prompt",
        "The capital of France is",
        "-n",
        "2",
        "--store",
        root,
        "--run",
        "seed",
    )
    assert out.returncode == 0, out.stderr
    return root


def _one_line_error(out, message):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stdout == ""


# -------------------------------------------------------- values rejected before work
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    torch.save(torch.tensor([float("nan")] * 576), folder / "nan.pt")
    (folder / "latin1.jsonl").write_bytes('{"id": "a", "text": "caf\xe9"}\n'.encode("latin-1"))
    (folder / "dir.jsonl").mkdir()
    (folder / "dir.pt").mkdir()
    (folder / "p.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    return folder


COMPUTE_CASES = [
    (["--scale", "nan", "--probe", "noise"], "argument --scale: must be a finite number, got 'nan'"),
    (["--scale", "inf"], "argument --scale: must be a finite number, got 'inf'"),
    (["--alpha", "-inf", "--probe", "steer", "--vector", "{bad}/nan.pt"], "must be a finite number, got '-inf'"),
    (["--temperature", "nan", "--sample"], "argument --temperature: must be a finite number"),
    (["--seed", str(2**64)], "seed must be < 18446744073709551616"),
    (["--probe", "steer", "--vector", "{bad}/nan.pt"], "holds 576 non-finite value(s)"),
    (["--device", "cuda"], "device 'cuda' is not available"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--layers", "30"], "layer 30: smollm2-135m has 30 layers, 0-29"),
    (["--layers", "-31"], "layer -31: smollm2-135m has 30 layers"),
    (["--png", "{tmp}/map.xyz"], "unknown figure format '.xyz'"),
    (["--png", "{tmp}/missing/map.png"], "--png: folder"),
    (
        [
            "--probe",
            "steer",
            "--positive",
            "{bad}/latin1.jsonl",
            "--negative",
            "{bad}/latin1.jsonl",
            "--save-vector",
            "{tmp}/missing/v.pt",
        ],
        "save: cannot be written",
    ),
    (["--probe", "steer", "--vector", "{tmp}/v.bin"], "vector must be a .pt, .npy, .safetensors file"),
    # output paths that cannot be written (issue 21 item 5): os.access says yes to root there
    (["--png", "/proc/map.png"], "--png: folder /proc is not writable"),
    (["--png", "{bad}/nan.pt/map.png"], "--png: folder {bad}/nan.pt does not exist"),
    (
        [
            "--probe",
            "steer",
            "--positive",
            "{bad}/p.jsonl",
            "--negative",
            "{bad}/p.jsonl",
            "--save-vector",
            "/proc/v.pt",
        ],
        "save: cannot be written: folder '/proc'",
    ),
    (
        [
            "--probe",
            "steer",
            "--positive",
            "{bad}/p.jsonl",
            "--negative",
            "{bad}/p.jsonl",
            "--save-vector",
            "{bad}/dir.pt",
        ],
        "save: cannot be written: '{bad}/dir.pt' is a folder",
    ),
    (["-n", "9000"], "exceeds smollm2-135m's context of 8192"),
    (["--prompt-file-instead", "{bad}/latin1.jsonl"], "not UTF-8 text"),
    (["--prompt-file-instead", "{bad}/dir.jsonl"], "is a folder"),
    (["--layers"], "argument --layers: expected one argument"),
    (["--probe"], "argument --probe: expected one argument"),
]


@pytest.mark.parametrize("args, message", COMPUTE_CASES, ids=[c[1][:40] for c in COMPUTE_CASES])
def test_compute_bad_input(args, message, seeded_store, bad_files, tmp_path):
    args = [a.format(bad=bad_files, tmp=tmp_path) for a in args]
    message = message.format(bad=bad_files, tmp=tmp_path)
    source = ["--prompt", "The capital of France is"]
    if args and args[0] == "--prompt-file-instead":
        source, args = ["--prompts", args[1]], args[2:]
    before = _checksums(seeded_store)
    out = run_cli("compute", "--model", "smollm2-135m", *source, *args, "--store", seeded_store, "--run", "seed")
    _one_line_error(out, message)
    assert _checksums(seeded_store) == before


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfename: x\n", "not UTF-8 text"),
        (None, "is a folder, not a YAML file"),
        (
            b"name: x\nmodels: [smollm2-135m]\nprompts: [{path: P}]\nprobes: [{name: noise, scale: .nan}]\n",
            "probe noise: scale must be a finite number, got nan",
        ),
        (
            b"name: x\nmodels: [smollm2-135m]\nprompts: [{path: P}]\nprobes: [logit_lens]\n"
            b"generation: {temperature: .inf}\n",
            "generation.temperature must be a finite number, got inf",
        ),
        (
            b"name: x\nmodels: [smollm2-135m]\nprompts: [{path: P}]\nprobes: [logit_lens]\nlayers: 0-40\n",
            "layer 40: smollm2-135m has 30 layers",
        ),
        (b"name: x\nmodels: [nope-model]\nprompts: [{path: P}]\nprobes: [logit_lens]\n", "unknown model 'nope-model'"),
        (
            b"name: x\nmodels: [{name: smollm2-135m, dtype: fp8}]\nprompts: [{path: P}]\nprobes: [logit_lens]\n",
            "models[0].dtype: unknown dtype 'fp8'",
        ),
        (
            b"name: x\nmodels: [{name: smollm2-135m, device_map: {model.layers.3: meta}}]\nprompts: [{path: P}]\n"
            b"probes: [logit_lens]\n",
            "device_map puts 'model.layers.3' on the meta device",
        ),
        (
            b"name: x\nmodels: [{name: smollm2-135m, device_map: fastest}]\n"
            b"prompts: [{path: P}]\nprobes: [logit_lens]\n",
            "device_map must be one of auto, balanced, balanced_low_0, sequential",
        ),
    ],
)
def test_run_bad_config_before_ray(tmp_path, seeded_store, content, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "text": "hello"}\n')
    config = tmp_path / "cfg.yaml"
    if content is None:
        config.mkdir()
    else:
        config.write_bytes(content.replace(b"P", str(prompts).encode()))
    before = _checksums(seeded_store)
    start = time.time()
    out = run_cli("run", config, "--store", seeded_store, env={"RAY_ADDRESS": ""})
    _one_line_error(out, message)
    assert _checksums(seeded_store) == before
    assert time.time() - start < 60  # nothing started: no Ray, no model load


@pytest.mark.parametrize(
    "argv, message",
    [
        (["report", "--store", "{store}", "--out", "/proc/rep"], "cannot write the report to /proc/rep"),
        (["report", "--store", "{store}", "--out", "{cfg}/rep"], "cannot write the report to"),
        (["run", "{cfg}", "--store", "/proc/sys"], "store /proc/sys is not writable"),
        (["run", "{cfg}", "--store", "{cfg}/store"], "cannot create store"),
        (["compute", "--model", "smollm2-135m", "--prompt", "hi", "--store", "/proc"], "store /proc is not writable"),
    ],
)
def test_output_folders_that_cannot_be_written(seeded_store, tmp_path, argv, message):
    (tmp_path / "p.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"name: x\nmodels: [smollm2-135m]\nprompts: [{{path: {tmp_path / 'p.jsonl'}}}]\nprobes: [logit_lens]\n"
    )
    before = _checksums(seeded_store)
    out = run_cli(*[a.format(store=seeded_store, cfg=cfg) for a in argv], env={"RAY_ADDRESS": ""})
    _one_line_error(out, message)
    assert _checksums(seeded_store) == before


# Checks that would fail every prompt, from the model's config (issue 21 item 4): one path
# (klstore.run.preflight) for `compute` before the load and `run` before Ray. A problem of one
# prompt (too long) is that prompt's in a run: test_exit_status_tells_how_many_prompts_failed.
PREFLIGHT_CASES = [
    ({"generation": {"max_new_tokens": 400}}, ["-n", "400"], "400 new tokens: with any prompt that exceeds"),
    ({"generation": {"max_new_tokens": 256}}, ["-n", "256"], "tiny-llama's context of 256"),
    ({"layers": "0,7"}, ["--layers", "0,7"], "tiny-llama has 4 layers, 0-3"),
    (
        {"probes": [{"name": "steer", "vector": "{tmp}/v.pt"}]},
        ["--probe", "steer", "--vector", "{tmp}/v.pt"],
        "steering vector {tmp}/v.pt has width 576; the model's hidden size is 32",
    ),
]


@pytest.mark.parametrize("config, flags, message", PREFLIGHT_CASES, ids=[c[2][:30] for c in PREFLIGHT_CASES])
def test_run_checks_what_compute_checks_before_work(tiny_model_dir, seeded_store, tmp_path, config, flags, message):
    torch.save(torch.ones(576), tmp_path / "v.pt")
    message = message.format(tmp=tmp_path)
    text = config.get("prompt", "hello there")
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "a", "text": text}) + "\n")
    body = {
        "name": "x",
        "models": [{"name": str(tiny_model_dir), "label": "tiny-llama"}],
        "prompts": [{"path": str(tmp_path / "p.jsonl")}],
        "probes": ["logit_lens"],
        **{k: v for k, v in config.items() if k != "prompt"},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(body).replace("{tmp}", str(tmp_path)))))
    flags = [f.format(tmp=tmp_path) for f in flags]
    if "--prompt" not in flags:
        flags += ["--prompt", text]
    before = _checksums(seeded_store)
    start = time.time()
    ran = run_cli("run", tmp_path / "cfg.yaml", "--store", seeded_store, env={"RAY_ADDRESS": ""})
    _one_line_error(ran, message)
    assert time.time() - start < 60  # nothing started: no Ray, no model load
    computed = run_cli(
        "compute", "--model", tiny_model_dir, "--label", "tiny-llama", *flags, "--store", seeded_store, "--run", "seed"
    )
    _one_line_error(computed, message)
    assert _checksums(seeded_store) == before


def test_negative_layer_spec_after_a_space(tiny_model_dir):
    out = run_cli(
        "compute", "--model", tiny_model_dir, "--prompt", "hello there", "-n", "2", "--layers", "-2--1", "--json"
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompts"][0]["probes"][0]["layers"] == [2, 3]


# ------------------------------------------------------------------ --png names
def test_png_names_never_collide_and_a_folder_works(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a/b", "text": "one two"}\n{"id": "a_b", "text": "three four"}\n')
    folder = tmp_path / "maps"
    folder.mkdir()
    out = run_cli("compute", "--model", tiny_model_dir, "--prompts", prompts, "-n", "2", "--png", folder)
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and names[0] != names[1] and all(n.endswith("-logit_lens.png") for n in names)
    out = run_cli("compute", "--model", tiny_model_dir, "--prompts", prompts, "-n", "2", "--png", tmp_path / "m.svg")
    assert out.returncode == 0, out.stderr
    svgs = sorted(p.name for p in tmp_path.glob("m-*.svg"))
    assert len(svgs) == 2 and svgs[0] != svgs[1]


# ------------------------------------------------------------------ exit status
@pytest.mark.parametrize(
    "n_long, code, last_line",
    [
        (0, 0, None),
        (1, 0, "klstore: 1 of 2 prompt x model results failed"),
        (2, 1, "klstore: 2 of 2 prompt x model results failed"),
    ],
)
def test_exit_status_tells_how_many_prompts_failed(
    ray_session, tiny_model_dir, tmp_path, capsys, n_long, code, last_line
):
    """`klstore run` records a prompt too long for the tiny model's 256-token context as failed."""
    config = _config(tmp_path, [{"name": str(tiny_model_dir), "label": "tiny"}], n_prompts=2)
    texts = ["many words " * 200 if i < n_long else f"prompt {i} says" for i in range(2)]
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    assert main(["run", str(config), "--progress-every", "1"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    if last_line:
        assert err[-1].startswith(last_line), err[-1]
    else:
        assert not any(line.startswith("klstore:") for line in err), err[-3:]


def test_report_spec_that_matches_nothing(seeded_store, tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: none\ndivergence: js\n")  # the seed run has kl only
    out = tmp_path / "rep"
    assert main(["report", str(spec), "--store", str(seeded_store), "--out", str(out)]) == 2
    assert "matches no js values" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / ".rep.builds").exists()


# ---------------------------------------------------------------- write errors
def test_write_error_mid_run_is_one_line_and_keeps_earlier_shards(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import builtins

    from klstore.store import tables

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "text": f"prompt {i} here"}) + "\n" for i in range(4)))
    store = tmp_path / "store"
    calls = [0]

    def full_disk(path, mode="r", *args, **kwargs):  # the disk fills up on the second shard's kl file
        if "/kl/" in str(path) and ".parquet.tmp-" in str(path) and "w" in mode:
            calls[0] += 1
            if calls[0] == 2:
                raise OSError(28, "No space left on device", str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(tables, "open", full_disk, raising=False)
    code = main(
        [
            "compute",
            "--model",
            str(tiny_model_dir),
            "--prompts",
            str(prompts),
            "-n",
            "2",
            "--store",
            str(store),
            "--shard-size",
            "2",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("klstore: error: cannot write ") and "No space left" in err[-1]
    monkeypatch.undo()
    _, runs = views.sql(str(store), "SELECT status FROM runs")
    assert runs == [("failed",)]
    _, kept = views.sql(str(store), "SELECT count(DISTINCT prompt_id) FROM prompts")
    assert kept == [(2,)]  # the first shard is kept
    assert (
        main(
            [
                "compute",
                "--model",
                str(tiny_model_dir),
                "--prompts",
                str(prompts),
                "-n",
                "2",
                "--store",
                str(store),
                "--shard-size",
                "2",
            ]
        )
        == 0
    )  # and the resume completes it
    _, done = views.sql(str(store), "SELECT count(DISTINCT prompt_id), (SELECT status FROM runs) FROM prompts")
    assert done == [(4, "completed")]


# ------------------------------------------------------------- distributed faults
def _config(tmp_path, models, n_prompts=4):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"q{i}", "text": f"prompt {i} says"}) + "\n" for i in range(n_prompts))
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "store": str(tmp_path / "store"),
                "models": models,
                "prompts": [{"path": str(prompts)}],
                "probes": ["logit_lens"],
                "layers": "all",
                "generation": {"max_new_tokens": 2},
                "shard_size": 2,
            }
        )
    )
    return path


def test_run_shows_the_actors_real_error(ray_session, tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "vocab_size": -1}')
    cfg = load_config(
        _config(tmp_path, [{"name": str(tiny_model_dir), "label": "tiny"}, {"name": str(broken), "label": "broken"}])
    )
    summary = runner.run(cfg, progress_every=1)
    message = summary["failed_models"]["broken"]
    assert message.startswith(f"cannot load model {str(broken)!r}: ")
    assert "raise " not in message and "Traceback" not in message and "File " not in message


def test_actor_killed_while_loading_is_replaced(ray_session, tmp_path):
    cfg = load_config(_config(tmp_path, [{"name": "smollm2-135m", "actors": 1}], n_prompts=2))
    thread, killed = kill_when_seen("Worker.__init__", poll=0.01)
    summary = runner.run(cfg, progress_every=1)
    thread.join()
    assert killed, "no loading actor was seen"
    assert summary["status"] == "completed" and summary["progress"]["smollm2-135m"].lost_loads == 1
    _, rows = views.sql(cfg.store, "SELECT count(*), count(DISTINCT prompt_id) FROM prompts")
    assert rows == [(2, 2)]


def test_unreachable_ray_address_fails_fast(tmp_path):
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = _config(tmp_path, [{"name": "smollm2-135m"}], n_prompts=1)
    start = time.time()
    out = run_cli("run", config, env={"RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert time.time() - start < 30
    _one_line_error(out, f"cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:{port}")


def test_remote_message_picks_the_klstore_error():
    from klstore.errors import remote_message

    text = (
        'ray::Worker.__init__() (pid=1, ip=127.0.0.1)\n  File "x.py", line 3, in load\n'
        "    raise KlstoreError(\n"
        "klstore.errors.KlstoreError: cannot load model 'smollm9': unknown model 'smollm9'"
    )
    assert remote_message(RuntimeError(text)) == "cannot load model 'smollm9': unknown model 'smollm9'"
    assert remote_message(RuntimeError("a\n  File y\nValueError: bad value")) == "ValueError: bad value"
    with pytest.raises(KlstoreError):
        raise KlstoreError("x")
