"""The Python API (klstore.api): same numbers as the CLI, same rows in the store, the CLI's
error messages, a light `import klstore`, the quickstart notebook and the docs site."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, run_cli

PROMPT = "The capital of France is"
LAYERS = "0,15-21,27"
CLI_ARGS = [
    "--model",
    "smollm2-135m",
    "--device",
    "cpu",
    "--prompt",
    PROMPT,
    "--probe",
    "logit_lens",
    "--probe",
    "skip",
    "--layers",
    LAYERS,
    "-n",
    "5",
    "--divergence",
    "kl",
    "--divergence",
    "js",
]


@pytest.fixture(scope="module")
def lens(smollm2):
    """A Lens around the session's SmolLM2 (no reload); label and config as `load("smollm2-135m")`."""
    from klstore.api import Lens

    return Lens._wrap(smollm2, label="smollm2-135m", name="smollm2-135m")


@pytest.fixture(scope="module")
def result(lens):
    return lens.compute(
        PROMPT, probes=["logit_lens", "skip"], layers=LAYERS, n=5, divergences=["kl", "js"], progress=False
    )


def test_import_is_light():
    code = (
        "import sys, time; t = time.perf_counter(); import klstore; t = time.perf_counter() - t; "
        "heavy = [m for m in ('torch', 'transformers', 'ray') if m in sys.modules]; "
        "print(round(t, 4), heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    print("import klstore:", out.strip(), "seconds, heavy modules")
    assert out.strip().endswith("[]")


@pytest.mark.real_model
def test_compute_matches_cli_bit_for_bit(result):
    proc = run_cli("compute", *CLI_ARGS, "--json")
    assert proc.returncode == 0, proc.stderr
    cli = json.loads(proc.stdout)["prompts"][0]
    assert cli["id"] == "prompt" == result.prompts[0].id
    assert [t["id"] for t in cli["tokens"]] == [t["id"] for t in result.tokens(0)]
    assert [t["logprob"] for t in cli["tokens"]] == [t["logprob"] for t in result.tokens(0)]
    for probe in cli["probes"]:
        assert tuple(probe["layers"]) == result.layers
        for name, rows in probe["matrices"].items():
            expected = np.array([[np.nan if v is None else v for v in row] for row in rows], np.float32)
            np.testing.assert_array_equal(result.matrix(0, probe["probe"], name), expected)
        np.testing.assert_array_equal(result.top1(0, probe["probe"]), np.array(probe["top1_match"]))


def _kl_view(store_dir):
    import klstore

    return klstore.open_store(store_dir).sql("SELECT * FROM kl ORDER BY probe, prompt_id, layer, gen_idx")


@pytest.mark.real_model
def test_save_writes_what_compute_store_writes(result, tmp_path):
    import pandas as pd

    run_id = result.save(tmp_path / "api", run="nb", progress=False)
    proc = run_cli("compute", *CLI_ARGS, "--store", tmp_path / "cli", "--run", "nb")
    assert proc.returncode == 0, proc.stderr
    assert f"run {run_id} completed" in proc.stdout  # the same run id
    ours, theirs = _kl_view(tmp_path / "api"), _kl_view(tmp_path / "cli")
    pd.testing.assert_frame_equal(ours, theirs)
    for table in ("generations", "prompts"):
        query = f"SELECT * EXCLUDE (run_id) FROM {table} ORDER BY ALL"
        import klstore

        pd.testing.assert_frame_equal(
            klstore.open_store(tmp_path / "api").sql(query), klstore.open_store(tmp_path / "cli").sql(query)
        )
    # to_pandas() is the kl view, row for row, once saved
    mine = result.to_pandas().sort_values(["probe", "prompt_id", "layer", "gen_idx"], ignore_index=True)
    pd.testing.assert_frame_equal(mine, ours, check_dtype=False)
    assert (mine["run_id"] == run_id).all()
    # saving again resumes: nothing is added
    result.save(tmp_path / "api", run="nb", progress=False)
    assert len(_kl_view(tmp_path / "api")) == len(ours)


@pytest.mark.real_model
def test_result_views(result, tmp_path):
    import klstore

    assert result.matrix(0).shape == (len(LAYERS.split(",")) + 6, 5)  # 0, 15-21 (7), 27
    assert result.matrix("prompt", "skip", "js").dtype == np.float32
    assert [t["gen_idx"] for t in result.tokens("prompt")] == list(range(5))
    lens = result.lens_tokens(0, "logit_lens")  # what each layer predicts, as `compute --tokens --json`
    m = result.klmatrix(0, "logit_lens")
    assert [[[t["id"] for t in cell] for cell in row] for row in lens["topk"]] == m.topk_ids.tolist()
    assert lens["topk"][-1][0][0]["text"] == result.lens.engine.tokenizer.decode([int(m.topk_ids[-1, 0, 0])])
    assert lens["gen_rank"] == m.gen_rank.tolist()
    table = result.lens_table(0, "logit_lens").splitlines()
    assert "top-1 token of Q per layer" in table[0] and len(table) == 2 + len(result.layers)
    html = result._repr_html_()
    assert "klstore Result: smollm2-135m" in html and "data:image/png;base64," in html
    fig = result.plot(0, "skip", "js")
    assert fig.axes[0].get_title() == "smollm2-135m | skip | prompt"
    run_id = result.save(tmp_path, run="views", progress=False)
    store = klstore.open_store(tmp_path)
    assert store.sql("SELECT status FROM runs WHERE run_id = ?", [run_id])["status"].tolist() == ["completed"]
    assert store.heatmap("smollm2-135m", "logit_lens").axes[0].get_ylabel() == "Layer"
    with pytest.raises(klstore.KlstoreError, match="no kl rows"):
        store.heatmap("smollm2-135m", "logit_lens", group="nope")
    with pytest.raises(klstore.KlstoreError, match="SQL error"):
        store.sql("SELECT nope FROM kl")
    for bad in (5, "nope"):
        with pytest.raises(klstore.KlstoreError, match="prompt"):
            result.matrix(bad)


@pytest.mark.real_model
def test_in_memory_model_matches_load(result):
    import torch
    import transformers

    import klstore
    from klstore.core.models import resolve

    source = resolve("smollm2-135m")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source.location, gguf_file=source.gguf_file, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    lens = klstore.load(model=model, tokenizer=tokenizer, label="smollm2-135m")
    mine = lens.compute(
        PROMPT, probes=["logit_lens", "skip"], layers=LAYERS, n=5, divergences=["kl", "js"], progress=False
    )
    assert [t["id"] for t in mine.tokens(0)] == [t["id"] for t in result.tokens(0)]
    for probe in ("logit_lens", "skip"):
        for name in ("kl", "js"):
            np.testing.assert_allclose(mine.matrix(0, probe, name), result.matrix(0, probe, name), rtol=1e-5, atol=1e-5)


def _cli(*changes):
    """`compute` arguments for smollm2-135m and PROMPT, with flags replaced or added."""
    args = {"--model": "smollm2-135m", "--device": "cpu", "--prompt": PROMPT}
    extra = []
    for flag, value in zip(changes[::2], changes[1::2]):
        if flag in args:
            args[flag] = value
        else:
            extra += [flag, value]
    return [x for pair in args.items() for x in pair] + extra


# case -> (the CLI's arguments, the same input to the API)
BAD_INPUTS = {
    "unknown model": (_cli("--model", "no-such-model"), dict(load="no-such-model")),
    "layer syntax": (_cli("--layers", "0,x"), dict(layers="0,x")),
    "layer range": (_cli("--layers", "0,40"), dict(layers="0,40")),
    "empty prompt": (_cli("--prompt", "   "), dict(prompts="   ")),
    "unknown probe": (_cli("--probe", "nope"), dict(probes=["nope"])),
    "unknown divergence": (_cli("--divergence", "nope"), dict(divergences=["nope"])),
    "probe params": (
        _cli("--probe", "noise", "--scale", "-1"),
        dict(probes=[{"name": "noise", "params": {"scale": -1.0}}]),
    ),
    "n <= 0": (_cli("-n", "0"), dict(n=0)),
    "patch without source": (_cli("--probe", "patch"), dict(probes=["patch"])),
    "topk": (_cli("--topk", "101"), dict(topk=101)),
    "clean pass": (_cli("--clean-pass", "fast"), dict(clean_pass="fast")),
    "matmul precision": (_cli("--matmul-precision", "low"), dict(matmul_precision="low")),
}


@pytest.mark.real_model
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_the_cli_message(case, lens):
    import klstore

    cli_args, api_args = BAD_INPUTS[case]
    proc = run_cli("compute", *cli_args)
    assert proc.returncode == 2
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("klstore: error: ")
    with pytest.raises(klstore.KlstoreError) as caught:
        if "load" in api_args:
            klstore.load(api_args["load"], device="cpu")
        else:
            call = {"prompts": PROMPT, "progress": False, **api_args}
            lens.compute(call.pop("prompts"), **call)
    assert str(caught.value) == message[len("klstore: error: ") :]


@pytest.mark.real_model
def test_api_only_input_errors(lens, tmp_path):
    import klstore

    cases = [
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=["a b", {"id": "p0", "text": "c d"}]), "prompts[1]: duplicate id 'p0'"),
        (dict(prompts=[{"id": "x"}]), "prompts[0]: missing 'text'"),
        (dict(prompts=["ok", " "]), "prompt 'p1' is empty"),
        (dict(prompts=str(tmp_path / "missing.jsonl")), "prompts file not found"),
        (
            dict(prompts=PROMPT, probes=[{"name": "noise", "scale": 1.0}, {"name": "noise", "scale": 2.0}]),
            "probe noise given twice",
        ),
        (dict(prompts=PROMPT, layers=[0, 1]), "layers must be a layer spec"),
    ]
    for kwargs, message in cases:
        with pytest.raises(klstore.KlstoreError, match=message.replace("[", r"\[").replace("]", r"\]")):
            lens.compute(kwargs.pop("prompts"), progress=False, **kwargs)
    with pytest.raises(klstore.KlstoreError, match="not both"):
        klstore.load()
    with pytest.raises(klstore.KlstoreError, match="needs tokenizer"):
        klstore.load(model=lens.loaded.model)
    with pytest.raises(klstore.KlstoreError, match="store"):
        klstore.open_store(tmp_path / "no-store-here")


@pytest.mark.real_model
def test_prompt_forms(lens, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "text": "One two three", "group": "g"}\n')
    from_file = lens.compute(path, layers="-2--1", n=2, progress=False)
    from_list = lens.compute(["One two three"], layers="-2--1", n=2, progress=False)
    from_dict = lens.compute([{"id": "a", "text": "One two three", "group": "g"}], layers="-2--1", n=2, progress=False)
    assert [p.id for p in from_list.prompts] == ["p0"]
    assert from_file.prompts == from_dict.prompts
    np.testing.assert_array_equal(from_file.matrix("a"), from_list.matrix("p0"))


@pytest.mark.real_model
def test_quickstart_notebook_runs(tmp_path):
    import nbclient
    import nbformat

    nb = nbformat.read(REPO / "docs" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on any cell error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_docs_site_builds_strict_with_the_api_reference(tmp_path):
    """`make docs` (mkdocs in its own build/venv-docs, strict mode) builds the site with the API
    reference generated from the docstrings and the notebook rendered; it prints no warning."""
    site = tmp_path / "site"
    proc = subprocess.run(["make", "docs", f"SITE={site}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING -" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr  # mkdocs' own warnings
    reference = (site / "reference" / "index.html").read_text(encoding="utf-8")
    for name in ("klstore.api.load", "klstore.api.Lens.compute", "klstore.api.Result.save", "klstore.api.open_store"):
        assert f'id="{name}"' in reference, name
    assert "klstore.load" in (site / "quickstart" / "index.html").read_text(encoding="utf-8")


def test_docs_strict_build_fails_on_a_broken_link_or_anchor(tmp_path):
    """The strict build is what catches broken docs: the same site with one link to a missing
    page, or to a missing anchor, fails and names it."""
    import shutil

    mkdocs = REPO / "build" / "venv-docs" / "bin" / "mkdocs"
    if not mkdocs.exists():  # `make docs` makes it; the test above runs it first
        subprocess.run(["make", "build/venv-docs/.installed"], cwd=REPO, check=True, timeout=600)
    for broken, named in (
        ("[gone](no-such-page.md)", "no-such-page.md"),
        ("[gone](store.md#no-such-anchor)", "no-such-anchor"),
    ):
        copy = tmp_path / named.replace(".", "-")
        shutil.copytree(REPO / "docs", copy / "docs")
        shutil.copytree(REPO / "klstore", copy / "klstore", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "mkdocs.yml", copy / "mkdocs.yml")
        page = copy / "docs" / "cli.md"
        page.write_text(page.read_text(encoding="utf-8") + f"\nSee {broken}.\n", encoding="utf-8")
        proc = subprocess.run(
            [str(mkdocs), "build", "--strict", "--site-dir", str(copy / "site")],
            cwd=copy,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode != 0 and named in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.real_model
def test_speed_modes_through_the_api_save_as_their_own_run(lens, result, tmp_path):
    """compute(clean_pass=, matmul_precision=) as the CLI's flags: values near the default's, and
    save() gives the run the id `compute --store` with the same flags gives it."""
    fast = lens.compute(
        PROMPT,
        probes=["logit_lens", "skip"],
        layers=LAYERS,
        n=5,
        divergences=["kl", "js"],
        progress=False,
        clean_pass="cached",
        matmul_precision="medium",
    )
    for probe in ("logit_lens", "skip"):
        for name in ("kl", "js"):
            np.testing.assert_allclose(fast.matrix(0, probe, name), result.matrix(0, probe, name), atol=2e-2, rtol=2e-2)
    run_id = fast.save(tmp_path / "api", run="nb", progress=False)
    assert run_id != result.save(tmp_path / "api", run="nb", progress=False)
    proc = run_cli(
        "compute",
        *CLI_ARGS,
        "--store",
        tmp_path / "cli",
        "--run",
        "nb",
        "--clean-pass",
        "cached",
        "--matmul-precision",
        "medium",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"run {run_id} completed" in proc.stdout


def test_compute_into_writes_what_save_writes_and_refuses_bad_shards(result, tmp_path):
    """Lens.compute_into (what `compute --store` runs) computes shard by shard: the same rows
    as Result.save of the same value; a shard size that is not a positive integer, or two
    prompts with one id, are one-line errors with nothing written."""
    import pandas as pd

    import klstore
    from klstore.spec import Prompt

    lens = result.lens
    run_id = result.save(tmp_path / "saved", run="nb", progress=False)
    summary = lens.compute_into(str(tmp_path / "into"), result.prompts, result.compute, run="nb", progress=False)
    assert (summary["run_id"], summary["prompts"], summary["failed"]) == (run_id, len(result.prompts), 0)
    pd.testing.assert_frame_equal(_kl_view(tmp_path / "saved"), _kl_view(tmp_path / "into"))
    for bad in (0, -1, True, 2.5):
        with pytest.raises(klstore.KlstoreError, match=f"shard_size must be a positive integer, got {bad!r}"):
            lens.compute_into(str(tmp_path / "bad"), result.prompts, result.compute, shard_size=bad)
    twice = [Prompt("a", "one two"), Prompt("a", "three four")]
    with pytest.raises(klstore.KlstoreError, match="duplicate prompt id 'a'"):
        lens.compute_into(str(tmp_path / "bad"), twice, result.compute)
    assert not (tmp_path / "bad").exists()


def test_a_model_path_whose_name_is_no_label_loads_and_computes_without_a_store(tiny_model_dir, tmp_path):
    """`klstore compute --model ./my model/` (a folder name that cannot name a store folder)
    computes and prints as it always did; only a store asks for a label (--label)."""
    odd = tmp_path / "my model (q4)"
    odd.symlink_to(tiny_model_dir, target_is_directory=True)
    proc = run_cli("compute", "--model", odd, "--prompt", "one two three", "--layers", "0", "-n", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("compute", "--model", odd, "--prompt", "one two", "-n", "2", "--store", tmp_path / "s")
    assert proc.returncode == 2 and "model label 'my model (q4)'" in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()
    proc = run_cli(
        "compute", "--model", odd, "--prompt", "one two", "-n", "2", "--store", tmp_path / "s", "--label", "odd"
    )
    assert proc.returncode == 0 and "completed: 1 prompts (0 failed)" in proc.stdout, proc.stderr
