"""Store integrity: compaction never doubles or loses a row, whatever step fails; a flipped
bit is found, quarantined and recomputed; corrupt files never take the store down."""

import os
import signal
import subprocess
import sys

import duckdb
import pytest
from faults import Faulty
from tiny_models import ToyTokenizer, build

from klstore.cli import main
from klstore.core.models import from_objects
from klstore.run.plan import RunPlan, execute_local
from klstore.run.worker import Worker
from klstore.spec import ComputeSpec, ExperimentConfig, GenerationSpec, ModelConfig, ProbeSpec, Prompt
from klstore.store import open_store, views
from klstore.store.integrity import JOURNAL_NAME, recover
from klstore.store.upkeep import compact, verify

PROMPTS = tuple(Prompt(f"q{i}", f"prompt number {i} says", group="g" if i % 2 else "h") for i in range(6))
PROBES = (ProbeSpec("logit_lens"), ProbeSpec("skip"))


@pytest.fixture(scope="module")
def tiny():
    return from_objects("tiny", build("llama"), ToyTokenizer())


def _config(uri: str) -> ExperimentConfig:
    return ExperimentConfig(
        name="integ",
        store=uri,
        models=(ModelConfig(name="tiny", label="tiny"),),
        prompt_paths=(),
        compute=ComputeSpec(PROBES, "all", ("kl", "js"), GenerationSpec(3)),
        shard_size=2,
        source="test",
        prompts=PROMPTS,
    )


def _run(tiny, uri: str) -> dict:
    """The whole experiment through the run plan (resumes: only missing shards are computed)."""
    plan = RunPlan(_config(uri))
    return execute_local(plan, Worker("tiny", "tiny", plan.store, loaded=tiny), say=lambda m: None)


def _totals(uri: str) -> dict:
    """Row counts and sums per table through klstore's views."""
    out = {}
    for table, column in (("kl", "kl"), ("generations", "logprob"), ("prompts", "n_generated")):
        _, rows = views.sql(uri, f"SELECT count(*), sum({column}) FROM {table}")
        out[table] = (rows[0][0], round(float(rows[0][1]), 4))
    return out


def _plain_count(root: str) -> int:
    """What a plain DuckDB reader of the folder sees: it must never count a row twice."""
    con = duckdb.connect()
    return con.execute(
        "SELECT count(*) FROM read_parquet(?, hive_partitioning = true)", [f"{root}/kl/**/*.parquet"]
    ).fetchone()[0]


@pytest.fixture(scope="module")
def baseline(tiny, tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("base") / "store")
    _run(tiny, uri)
    return _totals(uri)


def test_records_written_and_verify_clean(tiny, tmp_path, baseline):
    uri = str(tmp_path / "s")
    _run(tiny, uri)
    result = verify(open_store(uri))
    assert not any(result["problems"].values()) and result["duplicate_rows"] == 0
    # per shard: kl (2 probes) + generations + prompts + its attempt in shards; + the run
    # + the model's vocabulary (tokens)
    assert result["files"] == 3 * (2 + 1 + 1 + 1) + 1 + 1
    assert _totals(uri) == baseline


def _count_compaction_ops(tiny, tmp_path, monkeypatch) -> int:
    uri = str(tmp_path / "count")
    _run(tiny, uri)
    with monkeypatch.context() as patch:
        faulty = Faulty(patch, fail_at=-1)
        compact(open_store(uri))
    return faulty.calls


def test_every_failing_step_of_a_compaction(tiny, tmp_path, monkeypatch, baseline):
    n_ops = _count_compaction_ops(tiny, tmp_path, monkeypatch)
    assert n_ops >= 4 * 8  # per partition: journal x2, pending + record, 3 sources x2, 2 moves, journal
    for k in range(1, n_ops + 1):
        uri = str(tmp_path / f"k{k}")
        _run(tiny, uri)
        with monkeypatch.context() as patch:
            Faulty(patch, fail_at=k)
            with pytest.raises(OSError):
                compact(open_store(uri))
        # right after the failure: klstore sees every row once; a plain reader never twice
        assert _totals(uri) == baseline, f"op {k}"
        assert _plain_count(uri) <= baseline["kl"][0], f"op {k}"
        # the next command that verifies finishes or undoes it
        result = verify(open_store(uri))
        assert result["duplicate_rows"] == 0 and not result["problems"]["bad"], f"op {k}"
        assert not [p for p in open_store(uri).files("kl", suffix="") if p.endswith(JOURNAL_NAME)]
        assert _totals(uri) == baseline and _plain_count(uri) == baseline["kl"][0], f"op {k}"
        compact(open_store(uri))  # and a later compaction completes
        assert _totals(uri) == baseline and _plain_count(uri) == baseline["kl"][0], f"op {k}"


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), PermissionError(13, "Read-only")])
def test_full_disk_or_read_only_mid_compaction(tiny, tmp_path, monkeypatch, baseline, error):
    uri = str(tmp_path / "s")
    _run(tiny, uri)
    with monkeypatch.context() as patch:
        Faulty(patch, fail_at=3, error=error)  # the merged file's write
        with pytest.raises(OSError):
            compact(open_store(uri))
    assert _totals(uri) == baseline
    assert main(["compact", "--store", uri]) == 0
    assert _totals(uri) == baseline and _plain_count(uri) == baseline["kl"][0]


def test_compaction_killed_with_sigkill(tiny, tmp_path, baseline):
    uri = str(tmp_path / "s")
    _run(tiny, uri)
    script = (
        "import os, signal\n"
        "from klstore.store import Store, open_store\n"
        "from klstore.store.upkeep import compact\n"
        "calls = [0]\n"
        "original = Store.delete\n"
        "def delete(self, path):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    original(self, path)\n"
        "Store.delete = delete\n"
        f"compact(open_store({uri!r}))\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _totals(uri) == baseline
    assert _plain_count(uri) <= baseline["kl"][0]
    assert recover(open_store(uri)) == 1  # the dead process's journal is finished
    assert _totals(uri) == baseline and _plain_count(uri) == baseline["kl"][0]


def test_a_live_compaction_is_left_alone(tiny, tmp_path, baseline):
    uri = str(tmp_path / "s")
    _run(tiny, uri)
    store = open_store(uri)
    folder = os.path.dirname(store.files("kl")[0])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        import json
        import socket

        journal = {
            "state": "started",
            "sources": [],
            "target": "compact-x.parquet",
            "host": socket.gethostname(),
            "pid": sleeper.pid,
            "at": 0,
        }
        with open(os.path.join(folder, JOURNAL_NAME), "w") as handle:
            json.dump(journal, handle)
        assert recover(store) == 0
        merged = compact(store)
        assert folder not in [f for f, _ in merged]  # that partition is someone else's now
        assert _totals(uri) == baseline
    finally:
        sleeper.kill()
        sleeper.wait()
    assert recover(store) == 1  # once its process is gone, it is an interrupted compaction


def _flip_bit(path: str, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x10]))


@pytest.mark.parametrize("compacted", [False, True])
def test_flipped_bit_detected_quarantined_recomputed(tiny, tmp_path, baseline, compacted, capsys):
    uri = str(tmp_path / "s")
    _run(tiny, uri)
    if compacted:
        compact(open_store(uri))
    store = open_store(uri)
    victim = [p for p in store.files("kl") if "probe=skip" in p][0]
    _flip_bit(victim, 40)  # inside the first data page
    assert main(["verify", "--store", uri]) == 1
    out = capsys.readouterr().out
    assert f"bad: {victim}: content differs from its record (SHA-256 mismatch)" in out
    assert main(["verify", "--quarantine", "--store", uri]) == 0
    moved = [p for p in capsys.readouterr().out.splitlines() if p.startswith("quarantined: ")]
    assert len(moved) == 1 and os.path.exists(moved[0].split(": ", 1)[1]) and not os.path.exists(victim)
    assert _totals(uri)["kl"][0] < baseline["kl"][0]  # the skip rows it held are gone...
    summary = _run(tiny, uri)  # ...until the resume recomputes its shards
    assert summary["status"] == "completed"
    assert _totals(uri) == baseline
    result = verify(open_store(uri))
    assert not any(result["problems"].values()) and result["duplicate_rows"] == 0


def test_flipped_footer_and_truncated_file(tiny, tmp_path, capsys):
    uri = str(tmp_path / "s")
    _run(tiny, uri)
    store = open_store(uri)
    truncated, footer = store.files("kl")[:2]
    os.truncate(truncated, 100)
    size = os.path.getsize(footer)
    _flip_bit(footer, size - 12)  # inside the footer's metadata
    # other tables still answer; the broken one names its bad file and the cure
    assert main(["sql", "SELECT count(*) FROM prompts", "--store", uri, "--format", "csv"]) == 0
    assert capsys.readouterr().out.strip() == "count_star()\n6"
    assert main(["sql", "SELECT count(*) FROM kl", "--store", uri]) == 2
    err = capsys.readouterr().err
    assert truncated in err and "klstore verify" in err and len(err.strip().splitlines()) == 1
    assert main(["verify", "--store", uri]) == 1
    out = capsys.readouterr().out
    assert f"bad: {truncated}:" in out and f"bad: {footer}:" in out
    # every other command: one line naming the file, or work that goes on around it
    for argv in (["runs"], ["report", "--out", str(tmp_path / "rep")]):
        assert main([*argv, "--store", uri]) == 2, argv
        err = capsys.readouterr().err
        assert truncated in err and "klstore verify" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / ".rep.builds").exists()
    assert main(["compact", "--store", uri]) == 0  # partitions with a bad file are left as they are
    assert "skipped" in capsys.readouterr().err
    assert _run(tiny, uri)["status"] == "completed"  # the same run resumes around it
    # new work into the store still succeeds
    other = _config(uri).model_copy(update={"name": "other"})
    plan = RunPlan(other)
    assert execute_local(plan, Worker("tiny", "tiny", plan.store, loaded=tiny), say=lambda m: None)["failed"] == 0
    assert main(["verify", "--quarantine", "--store", uri]) == 0
    capsys.readouterr()
    assert main(["sql", "SELECT count(DISTINCT run_id) FROM kl", "--store", uri, "--format", "csv"]) == 0
    assert capsys.readouterr().out.strip().endswith("2")


def test_missing_file_unrecorded_file_and_old_store(tiny, tmp_path, capsys):
    uri = str(tmp_path / "s")
    _run(tiny, uri)
    store = open_store(uri)
    first, second = store.files("generations")[:2]
    os.unlink(first)  # a record whose file is missing
    os.unlink(second + ".sha256.json")  # a file with no record (as if copied in by hand)
    result = verify(store)
    assert result["problems"]["missing"] == [f"{first}.sha256.json: its file is missing"]
    assert result["problems"]["unrecorded"] == [f"{second}: no record"]
    assert views.sql(uri, "SELECT count(*) FROM generations")[1][0][0] == 4 * 3  # reads still work
    # a store written before records: every file unrecorded; verify --record records them
    for path in [p for t in ("kl", "generations", "prompts", "runs") for p in store.files(t, suffix=".json")]:
        os.unlink(path)
    assert main(["verify", "--store", uri]) == 1
    assert main(["verify", "--record", "--store", uri]) == 0
    capsys.readouterr()
    assert main(["verify", "--store", uri]) == 0


def test_strange_partition_folder_is_flagged_and_harmless(tiny, tmp_path, capsys):
    uri = str(tmp_path / "s")
    _run(tiny, uri)
    strange = os.path.join(uri, "kl", "model=a'b")
    os.makedirs(strange)
    assert main(["verify", "--store", uri]) == 1
    assert f"folders: {strange}: klstore never writes such a folder" in capsys.readouterr().out
    assert main(["sql", "SELECT count(*) FROM kl", "--store", uri]) == 0


def test_resume_over_a_corrupt_file_completes_and_verify_names_it(tiny, tmp_path, capsys):
    uri = str(tmp_path / "s")
    _run(tiny, uri)
    victim = open_store(uri).files("prompts")[0]
    os.truncate(victim, 10)
    assert _run(tiny, uri)["status"] == "completed"  # resume goes by file names and records
    assert main(["verify", "--store", uri]) == 1
    assert f"bad: {victim}: size 10 differs from its record" in capsys.readouterr().out
