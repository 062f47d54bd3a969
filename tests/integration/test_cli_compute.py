"""`klstore compute` as a user calls it, including every bad input the engine issue lists."""

import json

import numpy as np
import pytest
from conftest import run_cli

pytestmark = pytest.mark.real_model


def test_help_loads_no_torch():
    """`klstore --help` answers without importing torch, transformers or ray (checked directly,
    not by timing: speed belongs in benchmarks)."""
    import subprocess
    import sys

    script = (
        "import sys\nfrom klstore.cli import main\ntry:\n    main(['--help'])\n"
        "except SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'ray'}))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "compute" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_table_json_and_png(tmp_path):
    png = tmp_path / "map.png"
    out = run_cli(
        "compute",
        "--model",
        "smollm2-135m",
        "--prompt",
        "The capital of France is",
        "--probe",
        "logit_lens",
        "--layers",
        "0,15-21,27,-1",
        "-n",
        "5",
        "--png",
        png,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("smollm2-135m | prompt prompt | probe logit_lens | kl (nats)")
    assert 'Gen0 " Paris"' in lines[1]
    rows = [line.split() for line in lines[2:12]]
    assert [int(r[0]) for r in rows] == [0, 15, 16, 17, 18, 19, 20, 21, 27, 29]
    assert all(float(v) == 0.0 for v in rows[-1][1:])  # last layer's logit lens
    assert all(float(v) > 0.1 for v in rows[0][1:])
    from PIL import Image

    with Image.open(png) as image:
        assert image.size[0] > 300 and image.size[1] > 300

    js = run_cli(
        "compute",
        "--model",
        "smollm2-135m",
        "--prompt",
        "The capital of France is",
        "--layers",
        "0,15-21,27,-1",
        "-n",
        "5",
        "--json",
        "--divergence",
        "kl",
        "--divergence",
        "js",
        "--probe",
        "skip",
        "--probe",
        "logit_lens",
    )
    assert js.returncode == 0, js.stderr
    doc = json.loads(js.stdout)
    prompt = doc["prompts"][0]
    assert doc["model"] == "smollm2-135m" and prompt["tokens"][0]["text"] == " Paris"
    lens = next(p for p in prompt["probes"] if p["probe"] == "logit_lens")
    assert lens["layers"] == [0, 15, 16, 17, 18, 19, 20, 21, 27, 29]
    table = np.array([[float(v) for v in r[1:]] for r in rows])
    np.testing.assert_allclose(np.array(lens["matrices"]["kl"]), table, atol=6e-5)
    js_values = np.array(lens["matrices"]["js"])
    assert ((js_values >= 0) & (js_values <= np.log(2))).all()


def test_tokens_table_and_json():
    """The classic logit-lens table: the last layer's top-1 token is the generated one (greedy),
    shown with its space made visible; --json carries the top-k with probabilities."""
    args = (
        "compute",
        "--model",
        "smollm2-135m",
        "--prompt",
        "The capital of France is",
        "--layers",
        "0,25-29",
        "-n",
        "3",
        "--tokens",
    )
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "top-1 token of Q per layer" in lines[0]
    assert "Gen0 \u2423Paris" in lines[1] and "Gen2 \\n" in lines[1]
    rows = [line.split() for line in lines[2:8]]
    assert [int(r[0]) for r in rows] == [0, 25, 26, 27, 28, 29]
    assert rows[-1][1] == "\u2423Paris"
    doc = json.loads(run_cli(*args, "--json", "--topk", "3").stdout)
    probe = doc["prompts"][0]["probes"][0]
    tokens = doc["prompts"][0]["tokens"]
    assert len(probe["topk"]) == 6 and len(probe["topk"][0]) == 3 and len(probe["topk"][0][0]) == 3
    for row in probe["topk"]:
        for cell in row:
            probs = [t["prob"] for t in cell]
            assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert [cell[0]["text"] for cell in probe["topk"][-1]] == [t["text"] for t in tokens]
    assert probe["gen_rank"][-1] == [1, 1, 1]
    np.testing.assert_allclose(probe["gen_logq"][-1], [t["logprob"] for t in tokens], atol=1e-5)
    assert all(r >= 1 for row in probe["gen_rank"] for r in row)


def test_prompts_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"id": "a", "text": "The capital of France is", "group": "geo"}\n\n{"id": "b", "text": "1, 2, 3, 4,"}\n'
    )
    out = run_cli("compute", "--model", "smollm2-135m", "--prompts", path, "--layers", "-1", "-n", "2", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [p["id"] for p in doc["prompts"]] == ["a", "b"]
    assert [p["group"] for p in doc["prompts"]] == ["geo", "default"]


def _bad_file(tmp_path, text):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope-model", "--prompt", "x"], "unknown model 'nope-model'"),
        (["--model", "smollm2-135m", "--prompt", "x", "--layers", "40"], "layer 40: smollm2-135m has 30 layers, 0-29"),
        (["--model", "smollm2-135m", "--prompt", "x", "--layers", "3-x"], "malformed layer spec '3-x'"),
        (["--model", "smollm2-135m", "--prompt", "x", "--probe", "lens"], "unknown probe 'lens'"),
        (["--model", "smollm2-135m", "--prompt", "x", "-n", "0"], "must be a positive integer, got 0"),
        (["--model", "smollm2-135m", "--prompt", "   "], "prompt is empty"),
        (["--model", "smollm2-135m", "--prompt", "word " * 9000], "exceeds smollm2-135m's context of 8192"),
        (["--model", "smollm2-135m", "--prompt", "x", "--divergence", "l1"], "unknown divergence 'l1'"),
        (["--model", "smollm2-135m", "--prompt", "x", "--topk", "-1"], "topk must be an integer from 0 to 100, got -1"),
        (
            ["--model", "smollm2-135m", "--prompt", "x", "--topk", "five"],
            "topk must be an integer from 0 to 100, got 'five'",
        ),
        (
            ["--model", "smollm2-135m", "--prompt", "x", "--topk", "101"],
            "topk must be an integer from 0 to 100, got 101",
        ),
        (["--model", "smollm2-135m", "--prompt", "x", "--tokens", "--topk", "0"], "--tokens needs lens tokens"),
        (
            ["--model", "smollm2-135m", "--prompt", "x", "--clean-pass", "fast"],
            "unknown clean pass 'fast': choose exact, cached",
        ),
        (
            ["--model", "smollm2-135m", "--prompt", "x", "--clean-pass", ""],
            "unknown clean pass '': choose exact, cached",
        ),
        (
            ["--model", "smollm2-135m", "--prompt", "x", "--matmul-precision", "tf32"],
            "unknown matmul precision 'tf32': choose highest, high, medium",
        ),
        (
            ["--model", "smollm2-135m", "--prompt", "x", "--matmul-precision", "HIGH"],
            "unknown matmul precision 'HIGH': choose highest, high, medium",
        ),
        (["--model", "smollm2-135m", "--prompt", "x", "--tokens", "--store", "s"], "query the lens_tokens view"),
    ],
)
def test_bad_input(args, message):
    out = run_cli("compute", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert out.stdout == ""


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"id": "a", "text": "x"}\n{"id": "b", "text": \n', "bad.jsonl:2: invalid JSON"),
        ('{"text": "x"}\n', "bad.jsonl:1: missing 'id'"),
        ('{"id": "a"}\n', "bad.jsonl:1: missing 'text'"),
        ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "bad.jsonl:2: duplicate id 'a' (first on line 1)"),
        ('{"id": "a", "text": ""}\n', "bad.jsonl:1: prompt 'a' is empty"),
    ],
)
def test_bad_prompts_file(tmp_path, content, message):
    out = run_cli("compute", "--model", "smollm2-135m", "--prompts", _bad_file(tmp_path, content))
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_intervention_probes_from_the_command_line(tmp_path):
    out = run_cli(
        "compute",
        "--model",
        "smollm2-135m",
        "--prompt",
        "The capital of France is",
        "--source",
        "The capital of Italy is",
        "--layers",
        "10,20",
        "-n",
        "2",
        "--json",
        "--probe",
        "noise",
        "--scale",
        "0",
        "--probe",
        "patch",
        "--probe",
        "ablate_mlp",
    )
    assert out.returncode == 0, out.stderr
    probes = {p["probe"]: p for p in json.loads(out.stdout)["prompts"][0]["probes"]}
    assert probes["noise"]["params"] == {"scale": 0.0, "seed": 0}
    assert np.allclose(probes["noise"]["matrices"]["kl"], 0.0, atol=1e-6)
    assert all(v > 0 for row in probes["ablate_mlp"]["matrices"]["kl"] for v in row)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--probe", "noise", "--scale", "-2"], "probe noise: scale must be >= 0, got -2.0"),
        (["--probe", "patch"], "prompt 'prompt' has no source"),
        (["--probe", "steer"], "probe steer: give either vector"),
        (["--probe", "steer", "--vector", "/nonexistent/v.pt"], "steering vector file not found: /nonexistent/v.pt"),
        (["--probe", "steer", "--vector", "WIDE"], "has width 100; the model's hidden size is 576"),
    ],
)
def test_bad_probe_input_writes_nothing(tmp_path, args, message):
    import torch

    wide = tmp_path / "wide.pt"
    torch.save(torch.zeros(100), wide)
    args = [str(wide) if a == "WIDE" else a for a in args]
    store = tmp_path / "store"
    out = run_cli("compute", "--model", "smollm2-135m", "--prompt", "hello", "--store", store, *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert not list(store.rglob("*.parquet"))


@pytest.mark.parametrize("fast", [["--clean-pass", "cached"], ["--matmul-precision", "medium"]])
def test_fast_mode_is_a_run_of_its_own_with_a_measured_floor(tmp_path, tiny_model_dir, fast):
    """compute --store with --clean-pass cached or --matmul-precision medium: its own run id
    beside the exact run's, values near it, and a noise floor that compares it with the exact
    full-precision computation."""
    import numpy as np

    from klstore.cli import main
    from klstore.store import views

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "text": f"Prompt {i} says that"}) + "\n" for i in range(3)))
    store = str(tmp_path / "store")
    for extra in ([], fast):
        assert (
            main(
                [
                    "compute",
                    "--model",
                    str(tiny_model_dir),
                    "--prompts",
                    str(prompts),
                    "--store",
                    store,
                    "--probe",
                    "skip",
                    "-n",
                    "3",
                    "--shard-size",
                    "3",
                    *extra,
                ]
            )
            == 0
        )
    _, runs = views.sql(store, "SELECT run_id, noise_floor FROM runs ORDER BY run_id")
    assert len(runs) == 2 and runs[0][0] != runs[1][0]
    _, shards = views.sql(store, "SELECT run_id, noise_floor FROM shards ORDER BY run_id")
    assert len(shards) == 2 and all(floor is not None and 0 <= floor < 1e-2 for _, floor in shards)
    _, pairs = views.sql(
        store,
        """
        SELECT a.kl, b.kl FROM kl a JOIN kl b USING (prompt_id, layer, gen_idx)
        WHERE a.run_id < b.run_id""",
    )
    assert len(pairs) == 3 * 4 * 3
    a, b = np.array(pairs).T
    tolerance = 1e-5 if "cached" in fast else 1e-2
    np.testing.assert_allclose(a, b, atol=tolerance, rtol=tolerance)
    # the exact run's floor is batch composition alone; the fast run's also its distance from exact
    _, floors = views.sql(store, "SELECT s.noise_floor FROM shards s JOIN runs r USING (run_id) ORDER BY r.created_at")
    assert floors[0][0] < 1e-5 and floors[1][0] > floors[0][0]
