"""A run as a dataset (klstore.store.dataset): export -> import is exact, the export reads with plain
pyarrow, the card's header says what the store holds, a damaged file is caught before anything is
written, a failed import leaves the store as it was, and bad input is one line."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from dataset_helpers import HOSTILE, PROMPTS, make_store, run_files, run_rows, tiny_llama
from faults import Faulty

from klstore.api import export_run, import_run
from klstore.cli import main
from klstore.errors import KlstoreError
from klstore.store import card, dataset, views


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(store uri, exported run id, other run id, export folder): exported once through the CLI."""
    root = tmp_path_factory.mktemp("dataset")
    uri, run_id, other = make_store(tiny_llama(), root)
    assert main(["export", run_id, "--to", str(root / "export"), "--store", uri]) == 0
    return uri, run_id, other, root / "export"


def _copy(export: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    return copy


def _tree(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> SHA-256): what a store holds, byte for byte."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def test_round_trip_is_exact(source, tmp_path, capsys):
    uri, run_id, other, export = source
    target = str(tmp_path / "target")
    assert main(["import", str(export), "--store", target]) == 0
    assert f"imported run {run_id} into {target}" in capsys.readouterr().out
    assert run_rows(target, run_id) == run_rows(uri, run_id)  # every view row, every column
    mine, theirs = run_files(uri, run_id), run_files(target, run_id)
    assert sorted(theirs) == sorted(mine)  # the same files under the same names (shard keys, attempts)
    for path, (rows, shards) in mine.items():
        assert theirs[path][0].equals(rows, check_metadata=True), path  # types and the tokens file's metadata
        assert theirs[path][1] == shards, path  # the records' shard keys: resume sees the same shards
    _, ids = views.sql(target, "SELECT DISTINCT run_id FROM kl UNION SELECT run_id FROM runs")
    assert ids == [(run_id,)]  # the other run stayed home
    _, used = views.sql(uri, "SELECT DISTINCT lens_id FROM kl WHERE run_id = ? AND lens_id <> 'logit'", [run_id])
    (lens_id,) = [row[0] for row in used]
    assert list(json.loads((export / dataset.MANIFEST).read_text())["lens_files"]) == [lens_id]
    assert _tree(Path(uri) / "lens_files" / lens_id) == _tree(Path(target) / "lens_files" / lens_id)
    assert not (Path(target) / dataset.IMPORT_STAGING).exists()
    # the imported store is whole: verify finds nothing wrong
    assert main(["verify", "--store", target]) == 0


def test_import_through_the_api_twice_is_refused(source, tmp_path):
    _, run_id, _, export = source
    target = str(tmp_path / "target")
    result = import_run(export, store=target)
    assert result["run_id"] == run_id and result["rows"]["kl"] == len(run_rows(target, run_id)["kl"])
    before = _tree(Path(target))
    with pytest.raises(KlstoreError, match=f"run {run_id} is already in store .*; nothing imported"):
        import_run(export, store=target)
    assert _tree(Path(target)) == before


def test_export_reads_with_plain_pyarrow(source):
    uri, run_id, _, export = source
    for table in (*dataset.RUN_TABLES, "lens_tokens"):
        names, expected = views.sql(uri, f"SELECT * FROM {table} WHERE run_id = ? ORDER BY ALL", [run_id])
        read = pq.read_table(export / "data" / table)  # a folder of nothing but this table's Parquet files
        assert read.column_names == names, table
        got = sorted(tuple(row[n] for n in names) for row in read.to_pylist())
        assert got == sorted(expected), table
    assert len(expected) == 5 * 3 * 3 * 3 * 5  # lens tokens: prompts x tokens x layers x readouts x k
    texts = pq.read_table(export / "data" / "prompts").column("prompt_text").to_pylist()
    assert sum(HOSTILE in text for text in texts) == 1  # hostile text carried as it is


def test_card_says_what_the_store_holds(source):
    uri, run_id, _, export = source
    text = (export / "README.md").read_text(encoding="utf-8")
    meta, body = card.split(text)
    manifest = json.loads((export / dataset.MANIFEST).read_text())
    files = [p for p in manifest["checksums"] if p.endswith(".parquet")]
    configs = {c["config_name"]: c for c in meta["configs"]}
    assert list(configs) == ["kl", "prompts", "generations", "runs", "shards", "tokens", "lens_tokens"]
    for name, config in configs.items():
        (data,) = config["data_files"]
        assert data["split"] == "train"
        matched = sorted(
            p for p in files if fnmatch.fnmatch(p, data["path"]) and p.count("/") == data["path"].count("/")
        )
        assert matched == sorted(e["path"] for e in manifest["tables"][name]), name
    k = meta["klstore"]
    sql = lambda q: views.sql(uri, q, [run_id])[1]  # noqa: E731
    ((config_json, noise_floor, version, name),) = sql(
        "SELECT config, noise_floor, klstore_version, name FROM runs WHERE run_id = ?"
    )
    config = json.loads(config_json)
    assert (k["run_id"], k["run_name"], k["klstore_version"]) == (run_id, name, version)
    assert k["noise_floor"] == noise_floor and noise_floor is not None
    expected_hash = hashlib.sha256(
        "".join(f"{p.id}\t{p.group}\t{p.text}\t{p.source}\n" for p in PROMPTS).encode()
    ).hexdigest()
    assert k["prompts_sha256"] == expected_hash
    fingerprints = [r[0] for r in sql("SELECT DISTINCT fingerprint FROM shards WHERE run_id = ?")]
    assert len(fingerprints) == 1 and len(fingerprints[0]) == 16
    assert k["models"] == [{"label": "tiny", "name": f"tiny {HOSTILE}", "dtype": "auto", "fingerprints": fingerprints}]
    assert k["probe_names"] == [r[0] for r in sql("SELECT DISTINCT probe FROM kl WHERE run_id = ? ORDER BY 1")]
    assert k["probe_names"] == ["logit_lens", "skip", "tuned_lens"]
    assert k["layers"] == "0,2-3" and k["layers_stored"] == [0, 2, 3]
    assert k["divergences"] == ["kl", "js"] and k["probes"] == config["probes"]
    lenses = sql("SELECT DISTINCT probe, lens, lens_id FROM kl WHERE run_id = ? ORDER BY ALL")
    assert [(x["probe"], x["kind"], x["id"]) for x in k["lenses"]] == lenses
    tuned = [x for x in k["lenses"] if x["kind"] == "tuned"]
    assert tuned[0]["files"] is True and tuned[0]["provenance"]["id"] == tuned[0]["id"]
    for table in dataset.RUN_TABLES:
        assert k["rows"][table] == sql(f"SELECT count(*) FROM {table} WHERE run_id = ?")[0][0], table
    assert k["rows"]["tokens"] == 96 and k["config"] == config
    # hostile strings: read back exactly from the header, inert in the body
    assert HOSTILE in k["models"][0]["name"]
    assert "<script>" not in body and "&lt;script&gt;" in body
    assert not any(line.strip() == "---" for line in body.splitlines())
    assert text.splitlines().count("---") == 2  # even under Python's splitlines (U+2028 is a break there)
    for column in ("kl", "js", "layer", "gen_idx", "top1_match", "noise_floor", "fingerprint", "q_entropy"):
        assert f"| {card.md(column)} |" in body, column
    assert manifest["checksums"]["README.md"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_card_header_is_safe_yaml_for_any_string():
    nasty = ["---", "...", "a\n---\nb: 1", "x\u2028---", "'\"", "key: value", "- item", "null", "1.5", "\x85", "#", ""]
    data = {"configs": [{"config_name": "kl"}], "klstore": {f"k{i}": s for i, s in enumerate(nasty)}}
    text = card.header(data)
    assert yaml.safe_load(text) == data
    assert not any(line.strip() in ("---", "...") for line in text.splitlines())
    assert "\n".join(card.md(s) for s in nasty).count("\n") == len(nasty) - 1


@pytest.mark.parametrize(
    "damage",
    ["flip a kl byte", "flip a lens byte", "edit the card", "truncate a runs file", "remove a file", "add a file"],
)
def test_a_damaged_export_writes_nothing(source, tmp_path, damage):
    _, _, _, export = source
    copy = _copy(export, tmp_path)
    kl_file = sorted((copy / "data" / "kl").rglob("*.parquet"))[0]
    lens_file = sorted((copy / "lens_files").rglob("params.pt"))[0]
    runs_file = copy / "data" / "runs" / "run.parquet"
    named = {
        "flip a kl byte": kl_file,
        "flip a lens byte": lens_file,
        "edit the card": copy / "README.md",
        "truncate a runs file": runs_file,
    }
    if damage in named:
        path = named[damage]
        data = bytearray(path.read_bytes())
        if damage == "truncate a runs file":
            data = data[:-1]
        else:
            data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        message = f"{path}: checksum mismatch"
    elif damage == "remove a file":
        kl_file.unlink()
        message = f"{kl_file}: missing"
    else:
        path = copy / "data" / "kl" / "extra.parquet"
        shutil.copy(kl_file, path)
        message = f"{path}: not listed in klstore-export.json"
    target = tmp_path / "target"
    with pytest.raises(KlstoreError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        import_run(copy, store=str(target))
    assert "\n" not in str(info.value) and "nothing imported" in str(info.value)
    assert not target.exists()  # not even the store's folder


def test_a_failed_import_leaves_the_store_as_it_was(source, tmp_path, monkeypatch):
    """Every file operation of an import fails in turn: the target store (holding another run
    already) is byte for byte what it was, and the next import succeeds."""
    uri, run_id, other, export = source
    base = tmp_path / "base"
    assert export_run(other, tmp_path / "other", store=uri)["run_id"] == other
    import_run(tmp_path / "other", store=str(base))
    counter = Faulty(monkeypatch, fail_at=10**9)
    scratch = tmp_path / "scratch"
    shutil.copytree(base, scratch)
    import_run(export, store=str(scratch))
    operations = counter.calls
    monkeypatch.undo()
    assert operations > 20
    before = _tree(base)
    for fail_at in sorted({1, 2, operations // 3, operations // 2, operations - 3, operations - 1, operations}):
        target = tmp_path / f"t{fail_at}"
        shutil.copytree(base, target)
        with monkeypatch.context() as patch:
            Faulty(patch, fail_at=fail_at)
            with pytest.raises(OSError):
                import_run(export, store=str(target))
        assert _tree(target) == before, fail_at
    import_run(export, store=str(target))
    assert run_rows(str(target), run_id) == run_rows(uri, run_id)


def test_export_again_into_the_same_folder(source, tmp_path):
    uri, run_id, other, export = source
    copy = _copy(export, tmp_path)
    (copy / ".gitattributes").write_text("*.parquet filter=lfs\n")  # a Hub clone's own files stay
    stale = copy / "data" / "kl" / "tiny" / "skip"
    manifest = json.loads((copy / dataset.MANIFEST).read_text())
    result = export_run(run_id, copy, store=uri)
    assert result["run_id"] == run_id and (copy / ".gitattributes").exists() and stale.is_dir()
    assert json.loads((copy / dataset.MANIFEST).read_text())["checksums"] == manifest["checksums"]  # deterministic
    with pytest.raises(KlstoreError, match=f"holds the export of run {run_id}, not {other}"):
        export_run(other, copy, store=uri)


def _export_args(source, tmp_path, case):
    uri, run_id, other, export = source
    if case == "unknown run":
        return [
            "export",
            "no-such-run",
            "--to",
            str(tmp_path / "x"),
            "--store",
            uri,
        ], "run 'no-such-run' is not in store"
    if case == "--to is a file":
        (tmp_path / "f").write_text("x")
        return ["export", run_id, "--to", str(tmp_path / "f"), "--store", uri], "is a file, not a folder"
    if case == "--to holds something else":
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "notes.txt").write_text("mine")
        return [
            "export",
            run_id,
            "--to",
            str(tmp_path / "d"),
            "--store",
            uri,
        ], "is not empty and holds no klstore export"
    if case == "--to holds another run":
        return ["export", other, "--to", str(export), "--store", uri], f"holds the export of run {run_id}, not {other}"
    if case == "missing store":
        return ["export", run_id, "--to", str(tmp_path / "x"), "--store", str(tmp_path / "nope")], "does not exist"
    if case == "import a missing folder":
        return ["import", str(tmp_path / "nope"), "--store", str(tmp_path / "s")], "does not exist"
    if case == "import a file":
        (tmp_path / "f").write_text("x")
        return ["import", str(tmp_path / "f"), "--store", str(tmp_path / "s")], "is a file, not an export folder"
    if case == "import a folder that is no export":
        (tmp_path / "d").mkdir()
        return ["import", str(tmp_path / "d"), "--store", str(tmp_path / "s")], "is not a klstore export"
    copy = _copy(export, tmp_path)
    manifest = json.loads((copy / dataset.MANIFEST).read_text())
    if case == "manifest not JSON":
        (copy / dataset.MANIFEST).write_text("{not json")
        message = "not readable JSON"
    elif case == "manifest path outside the export":
        manifest["checksums"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
        (copy / dataset.MANIFEST).write_text(json.dumps(manifest))
        message = "is not a plain path inside the export"
    elif case == "manifest names another run's file":
        manifest["tables"]["kl"][0]["partition"]["run_id"] = "someone-else"
        (copy / dataset.MANIFEST).write_text(json.dumps(manifest))
        message = "belongs to run 'someone-else'"
    else:  # import into the store the run came from
        return ["import", str(copy), "--store", uri], f"run {run_id} is already in store"
    return ["import", str(copy), "--store", str(tmp_path / "s")], message


@pytest.mark.parametrize(
    "case",
    [
        "unknown run",
        "--to is a file",
        "--to holds something else",
        "--to holds another run",
        "missing store",
        "import a missing folder",
        "import a file",
        "import a folder that is no export",
        "manifest not JSON",
        "manifest path outside the export",
        "manifest names another run's file",
        "import into the run's own store",
    ],
)
def test_bad_input_is_one_line(source, tmp_path, capsys, case):
    argv, message = _export_args(source, tmp_path, case)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("klstore: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "s").exists() and not (tmp_path / "x").exists()


def test_lens_folder_name_is_the_run_layers():
    from klstore.run import lenses as run_lenses

    assert dataset.LENS_FILES == run_lenses.LENS_FILES
