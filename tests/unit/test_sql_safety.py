"""`klstore sql` and `klstore.store.connect()` are read-only and confined to the store."""

import hashlib
import os

import pytest

from klstore.cli import main
from klstore.core.models import from_objects
from klstore.run.plan import Job
from klstore.run.worker import Worker
from klstore.spec import GenerationSpec, ProbeSpec, Prompt
from klstore.store import connect
from tiny_models import ToyTokenizer, build


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sqlsafety") / "store"
    worker = Worker("tiny", "tiny", str(root), loaded=from_objects("tiny", build("llama"), ToyTokenizer()))
    prompts = [Prompt("a", "The quick brown fox"), Prompt("b", "Hello there")]
    worker.run_shard("r1", prompts, Job((ProbeSpec("logit_lens"),), "all", ("kl",), GenerationSpec(2)))
    return root


def _checksums(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                out[path] = hashlib.sha256(handle.read()).hexdigest()
    return out


SECRET = os.path.expanduser("~/.klstore-test-secret")


@pytest.mark.parametrize("query, message", [
    ("COPY (SELECT * FROM kl) TO 'STORE/kl/model=tiny/probe=logit_lens/run_id=r1/dup.parquet'",
     "COPY statements are refused"),
    ("COPY kl TO '/tmp/klstore-copy.csv'", "COPY statements are refused"),
    ("ATTACH '/tmp/klstore-attach.db' AS x", "ATTACH statements are refused"),
    ("INSTALL httpfs", "LOAD statements are refused"),
    ("LOAD httpfs", "LOAD statements are refused"),
    ("CREATE TABLE t AS SELECT 1", "CREATE statements are refused"),
    ("INSERT INTO kl SELECT * FROM kl", "INSERT statements are refused"),
    ("DROP VIEW kl", "DROP statements are refused"),
    ("SET enable_external_access = true", "SET statements are refused"),
    ("PRAGMA enable_profiling", "PRAGMA statements are refused"),
    ("CALL pragma_version()", "CALL statements are refused"),
    ("SELECT 1; SELECT 2", "give one SQL statement per call, got 2"),
    ("SELECT 1; COPY kl TO '/tmp/klstore-copy2.csv'", "give one SQL statement per call, got 2"),
    (f"SELECT * FROM read_text('{SECRET}')", "file system operations are disabled"),
    ("SELECT * FROM read_text('/etc/hostname')", "file system operations are disabled"),
    ("SELECT * FROM read_parquet('STORE/../outside.parquet')", "file system operations are disabled"),
])
def test_sql_refuses_writes_and_outside_files(store_dir, capsys, query, message):
    with open(SECRET, "w") as handle:
        handle.write("token")
    before = _checksums(store_dir)
    try:
        code = main(["sql", query.replace("STORE", str(store_dir)), "--store", str(store_dir)])
    finally:
        os.unlink(SECRET)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert _checksums(store_dir) == before
    assert not os.path.exists("/tmp/klstore-copy.csv") and not os.path.exists("/tmp/klstore-attach.db")


def test_read_only_queries_still_work(store_dir, capsys):
    assert main(["sql", "SELECT count(*) AS n FROM kl", "--store", str(store_dir), "--format", "csv"]) == 0
    assert capsys.readouterr().out.strip() == "n\n" + str(4 * 2 * 2)  # 4 layers x 2 tokens x 2 prompts
    assert main(["sql", "EXPLAIN SELECT * FROM kl", "--store", str(store_dir)]) == 0
    assert main(["sql", "WITH x AS (SELECT DISTINCT prompt_id FROM kl) SELECT count(*) FROM x",
                 "--store", str(store_dir), "--format", "csv"]) == 0
    assert capsys.readouterr().out.strip().endswith("\n2")


def test_connect_is_confined(store_dir):
    con = connect(str(store_dir))
    assert con.execute("SELECT count(DISTINCT prompt_id) FROM prompts").fetchone() == (2,)
    for statement in ("SELECT * FROM read_text('/etc/hostname')", "SET enable_external_access = true",
                      "INSTALL httpfs", "SET autoload_known_extensions = true"):
        with pytest.raises(Exception, match="disabled by configuration|configuration has been locked"):
            con.execute(statement)
