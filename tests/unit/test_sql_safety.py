"""`klstore sql` and `klstore.store.connect()` are read-only and confined to the store."""

import hashlib
import os

import pytest
from tiny_models import ToyTokenizer, build

from klstore.cli import main
from klstore.core.models import from_objects
from klstore.run.worker import Worker
from klstore.spec import ComputeSpec, GenerationSpec, ProbeSpec, Prompt
from klstore.store import connect


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sqlsafety") / "store"
    worker = Worker("tiny", "tiny", str(root), loaded=from_objects("tiny", build("llama"), ToyTokenizer()))
    prompts = [Prompt("a", "The quick brown fox"), Prompt("b", "Hello there")]
    worker.run_shard("r1", prompts, ComputeSpec((ProbeSpec("logit_lens"),), "all", ("kl",), GenerationSpec(2)))
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


@pytest.mark.parametrize(
    "query, message",
    [
        (
            "COPY (SELECT * FROM kl) TO 'STORE/kl/model=tiny/probe=logit_lens/run_id=r1/dup.parquet'",
            "COPY statements are refused",
        ),
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
    ],
)
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
    assert (
        main(
            [
                "sql",
                "WITH x AS (SELECT DISTINCT prompt_id FROM kl) SELECT count(*) FROM x",
                "--store",
                str(store_dir),
                "--format",
                "csv",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip().endswith("\n2")


def test_connect_is_confined(store_dir):
    con = connect(str(store_dir))
    assert con.execute("SELECT count(DISTINCT prompt_id) FROM prompts").fetchone() == (2,)
    for statement in (
        "SELECT * FROM read_text('/etc/hostname')",
        "SET enable_external_access = true",
        "INSTALL httpfs",
        "SET autoload_known_extensions = true",
    ):
        with pytest.raises(Exception, match="disabled by configuration|configuration has been locked"):
            con.execute(statement)


# Every statement form that can carry another statement, with a writing statement inside
# (issue 21): the gate judges the carried statement, the store stays byte-identical.
CARRIED_WRITES = [
    ("EXPLAIN ANALYZE COPY (SELECT 42 AS x) TO 'STORE/kl/pwn.parquet' (FORMAT parquet)", "COPY"),
    ("EXPLAIN COPY (SELECT 42 AS x) TO 'STORE/kl/pwn.parquet' (FORMAT parquet)", "COPY"),
    ("EXPLAIN (FORMAT json) COPY (SELECT 42 AS x) TO 'STORE/kl/pwn.parquet'", "COPY"),
    ("EXPLAIN ANALYZE (FORMAT json) COPY (SELECT 42 AS x) TO 'STORE/kl/pwn.parquet'", "COPY"),
    ("/* a */ EXPLAIN /* b */ ANALYZE /* c */ COPY (SELECT 42 AS x) TO 'STORE/kl/pwn.parquet'", "COPY"),
    ("explain analyze copy (select 42 as x) to 'STORE/kl/pwn.parquet'", "COPY"),
    ("COPY (PIVOT kl ON prompt_id USING avg(kl)) TO 'STORE/kl/pwn.parquet'", "COPY"),
    ("EXPLAIN ANALYZE COPY (PIVOT kl ON prompt_id USING avg(kl)) TO 'STORE/kl/pwn.parquet'", "COPY"),
    ("CREATE TABLE t AS PIVOT kl ON prompt_id USING avg(kl)", "CREATE"),
    ("EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1", "CREATE"),
    ("EXPLAIN ANALYZE INSERT INTO kl SELECT * FROM kl", "INSERT"),
    ("WITH x AS (SELECT 1) INSERT INTO kl PIVOT kl ON prompt_id USING avg(kl)", "WITH"),
    ("EXPLAIN ANALYZE DELETE FROM kl", "DELETE"),
    ("EXPLAIN ANALYZE UPDATE kl SET kl = 0", "UPDATE"),
    ("EXPLAIN ANALYZE SET VARIABLE klstore_kl = ['STORE/x.parquet']", "SET"),
    ("EXPLAIN ANALYZE PREPARE p AS COPY (SELECT 1) TO 'STORE/kl/pwn.parquet'", "PREPARE"),
    ("PREPARE p AS COPY (SELECT 1) TO 'STORE/kl/pwn.parquet'", "PREPARE"),
    ("CREATE VIEW v AS SELECT 1", "CREATE"),
    ("EXPLAIN ANALYZE INSTALL httpfs", "LOAD"),
    ("EXPLAIN ANALYZE CALL pragma_version()", "CALL"),
]


@pytest.mark.parametrize("query, kind", CARRIED_WRITES)
def test_carried_writes_are_refused(store_dir, capsys, query, kind):
    before = _checksums(store_dir)
    code = main(["sql", query.replace("STORE", str(store_dir)), "--store", str(store_dir)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"the store is read-only here: {kind} statements are refused" in err, err
    assert _checksums(store_dir) == before


def test_query_function_cannot_carry_a_write(store_dir, capsys):
    """DuckDB's query() table function takes only a SELECT: the carried COPY never runs."""
    before = _checksums(store_dir)
    query = f"SELECT * FROM query('COPY (SELECT 1) TO ''{store_dir}/kl/pwn.parquet''')"
    assert main(["sql", query, "--store", str(store_dir)]) == 2
    err = capsys.readouterr().err
    assert "SQL error" in err and len(err.strip().splitlines()) == 1, err
    assert _checksums(store_dir) == before


def test_carried_writes_are_refused_by_the_python_api(store_dir):
    from klstore import KlstoreError, open_store

    before = _checksums(store_dir)
    reader = open_store(str(store_dir))
    for query, kind in CARRIED_WRITES:
        with pytest.raises(KlstoreError, match=f"{kind} statements are refused"):
            reader.sql(query.replace("STORE", str(store_dir)))
    assert _checksums(store_dir) == before


# The store: layers 0-3 x Gen0-1 x prompts a, b; one probe (logit_lens), one run.
def _csv(store_dir, capsys, query):
    assert main(["sql", query, "--store", str(store_dir), "--format", "csv"]) == 0, capsys.readouterr().err
    return capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize(
    "query, expected",
    [
        # PIVOT without IN: DuckDB makes an ENUM type of the pivoted values first (a MULTI statement)
        (
            "PIVOT (SELECT prompt_id, layer FROM kl) ON prompt_id USING count(*) GROUP BY layer ORDER BY layer",
            ["layer,a,b", "0,2,2", "1,2,2", "2,2,2", "3,2,2"],
        ),
        ("PIVOT (SELECT prompt_id FROM kl) ON prompt_id IN ('a', 'b') USING count(*)", ["a,b", "8,8"]),
        ("SELECT * FROM (PIVOT (SELECT prompt_id FROM kl) ON prompt_id USING count(*))", ["a,b", "8,8"]),
        ("UNPIVOT (SELECT 1 AS a, 2 AS b) ON a, b INTO NAME k VALUE v ORDER BY k", ["k,v", "a,1", "b,2"]),
        (
            "SELECT column_name, count FROM (SUMMARIZE prompts) WHERE column_name = 'prompt_id'",
            ["column_name,count", "prompt_id,2"],
        ),
        ("SUMMARIZE SELECT layer FROM kl", None),
        ("DESCRIBE runs", None),
        ("SHOW TABLES", None),
        ("FROM prompts SELECT prompt_id ORDER BY prompt_id", ["prompt_id", "a", "b"]),
        ("FROM kl SELECT count(*) AS n", ["n", "16"]),
        ("TABLE prompts", None),
        ("VALUES (1, 'x'), (2, 'y')", ["col0,col1", "1,x", "2,y"]),
        ("EXPLAIN PIVOT (SELECT prompt_id FROM kl) ON prompt_id USING count(*)", None),
        ("EXPLAIN ANALYZE SELECT count(*) FROM kl", None),
        ("EXPLAIN ANALYZE (SELECT 1)", None),
        ("EXPLAIN (FORMAT json) FROM kl", None),
        ("/* why */ EXPLAIN ANALYZE VALUES (1) -- done", None),
    ],
)
def test_read_only_forms_are_accepted(store_dir, capsys, query, expected):
    before = _checksums(store_dir)
    lines = _csv(store_dir, capsys, query)
    if expected is not None:
        assert lines == expected
    elif "EXPLAIN" in query:
        assert lines[0].startswith("explain_key,explain_value") and len(lines) > 1
    else:
        assert len(lines) > 1
    assert _checksums(store_dir) == before


def test_read_only_forms_expected_rows(store_dir, capsys):
    assert _csv(store_dir, capsys, "SELECT name FROM (SHOW TABLES) ORDER BY name") == [
        "name",
        "generations",
        "kl",
        "lens_eval",
        "lens_tokens",
        "lenses",
        "prompts",
        "runs",
        "settling",
        "shards",
        "tokens",
    ]
    described = _csv(store_dir, capsys, "SELECT column_name FROM (DESCRIBE prompts) LIMIT 3")
    assert described == ["column_name", "run_id", "model", "prompt_id"]
    table = _csv(store_dir, capsys, "SELECT prompt_id, n_generated FROM (TABLE prompts) ORDER BY 1")
    assert table == ["prompt_id,n_generated", "a,2", "b,2"]


def test_pivot_through_the_python_api(store_dir):
    from klstore import open_store

    frame = open_store(str(store_dir)).sql(
        "PIVOT (SELECT prompt_id, layer FROM kl) ON prompt_id USING count(*) GROUP BY layer ORDER BY layer"
    )
    assert frame.columns.tolist() == ["layer", "a", "b"] and frame["a"].tolist() == [2, 2, 2, 2]


def test_stray_file_is_named_by_readers_and_quarantined(tmp_path, capsys):
    """A Parquet file outside the partition folders (e.g. copied in by hand): verify names it,
    every reader of its table names it in one line, `verify --quarantine` moves it aside."""
    import duckdb

    root = tmp_path / "store"
    worker = Worker("tiny", "tiny", str(root), loaded=from_objects("tiny", build("llama"), ToyTokenizer()))
    worker.run_shard(
        "r1",
        [Prompt("a", "The quick brown fox")],
        ComputeSpec((ProbeSpec("logit_lens"),), "all", ("kl",), GenerationSpec(2)),
    )
    capsys.readouterr()
    strays = [
        root / "kl" / "pwn.parquet",
        root / "prompts" / "model=tiny" / "x.parquet",
        root / "kl" / "model=tiny" / "probe=logit_lens" / "y.parquet",
    ]
    for path in strays:
        path.parent.mkdir(parents=True, exist_ok=True)
        duckdb.sql(f"COPY (SELECT 42 AS x) TO '{path}' (FORMAT parquet)")
    assert main(["verify", "--store", str(root)]) == 1
    out = capsys.readouterr().out
    for path in strays:
        assert f"stray: {path} is a stray file, not in a " in out, out
    for argv in (["sql", "SELECT count(*) FROM kl"], ["sql", "SELECT count(*) FROM prompts"], ["runs"]):
        assert main([*argv, "--store", str(root)]) == 2
        err = capsys.readouterr().err
        assert "is a stray file" in err and "klstore verify --quarantine" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert main(["sql", "SELECT count(*) FROM generations", "--store", str(root), "--format", "csv"]) == 0
    assert capsys.readouterr().out.strip() == "count_star()\n2"  # other tables still answer
    assert main(["verify", "--quarantine", "--store", str(root)]) == 0
    moved = [
        line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("quarantined: ")
    ]
    assert len(moved) == 3 and all(os.path.exists(p) for p in moved)
    assert not any(path.exists() for path in strays)
    assert main(["sql", "SELECT count(*) FROM kl", "--store", str(root), "--format", "csv"]) == 0
    assert capsys.readouterr().out.strip() == "count_star()\n8"
    assert main(["verify", "--store", str(root)]) == 0
