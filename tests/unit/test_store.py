"""The store: round trips through DuckDB, idempotent rewrites, crash safety, compaction, S3."""

import os
import subprocess
import sys

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from store_helpers import JOB, PROMPTS
from store_helpers import kl_rows as _kl_table
from store_helpers import tiny_worker as _worker
from tiny_models import ToyTokenizer, build

from klstore.cli import main
from klstore.core.engine import Engine
from klstore.core.models import from_objects
from klstore.run.worker import Worker
from klstore.spec import GenerationSpec, Prompt
from klstore.store import open_store, upkeep, views


@pytest.fixture(scope="module")
def tiny():
    return from_objects("tiny", build("llama"), ToyTokenizer())


def test_round_trip_equals_in_memory(tiny, tmp_path):
    uri = str(tmp_path / "store")
    worker = _worker(tiny, uri)
    worker.run_shard("r1", PROMPTS[:3], JOB)
    engine = Engine(tiny)  # the same batch as the shard, so the same numbers bit for bit
    in_memory = engine.run_many(PROMPTS[:3], list(JOB.probes), "all", ("kl", "js"), GenerationSpec(4))
    for prompt, matrices in zip(PROMPTS[:3], in_memory):
        for matrix in matrices:
            _, rows = views.sql(
                uri,
                "SELECT layer, gen_idx, kl, js, kl_reverse, top1_match, "
                "prompt_group, model FROM kl WHERE prompt_id = ? AND probe = ? "
                "AND run_id = ? ORDER BY layer, gen_idx",
                [prompt.id, matrix.probe, "r1"],
            )
            assert len(rows) == len(matrix.layers) * matrix.generation.n
            kl = np.array([r[2] for r in rows]).reshape(len(matrix.layers), -1)
            js = np.array([r[3] for r in rows]).reshape(len(matrix.layers), -1)
            np.testing.assert_array_equal(kl, matrix.values["kl"])
            np.testing.assert_array_equal(js, matrix.values["js"])
            assert [r[0] for r in rows[:: matrix.generation.n]] == list(matrix.layers)
            assert all(r[4] is None for r in rows)  # kl_reverse not asked for: null
            assert [r[5] for r in rows] == matrix.top1_match.reshape(-1).tolist()
            assert {r[6] for r in rows} == {prompt.group} and {r[7] for r in rows} == {"tiny-llama"}
    _, gens = views.sql(uri, "SELECT prompt_id, gen_idx, token_id FROM generations ORDER BY ALL")
    assert len(gens) == 12
    _, prompts = views.sql(uri, "SELECT prompt_id, status, n_generated FROM prompts ORDER BY ALL")
    assert prompts == [("p0", "ok", 4), ("p1", "ok", 4), ("p2", "ok", 4)]


def test_rerun_replaces_rows(tiny, tmp_path):
    uri = str(tmp_path / "store")
    worker = _worker(tiny, uri)
    worker.run_shard("r1", PROMPTS[:2], JOB)
    first = _kl_table(uri)
    worker.run_shard("r1", PROMPTS[:2], JOB)
    assert _kl_table(uri) == first
    assert len(first) == 2 * 2 * 4 * 4


def test_failed_prompt_is_recorded_and_others_go_on(tiny, tmp_path):
    uri = str(tmp_path / "store")
    too_long = Prompt("long", "x" * 200, "a")  # context is 128
    _worker(tiny, uri).run_shard("r1", [PROMPTS[0], too_long, PROMPTS[1]], JOB)
    _, rows = views.sql(uri, "SELECT prompt_id, status, error, n_generated FROM prompts ORDER BY prompt_id")
    assert rows[0][:2] == ("long", "error") and "exceeds tiny's context of 128" in rows[0][2]
    assert rows[0][3] == 0 and [r[1] for r in rows[1:]] == ["ok", "ok"]
    _, count = views.sql(uri, "SELECT count(DISTINCT prompt_id) FROM kl")
    assert count == [(2,)]


def test_interrupted_write_is_invisible_and_reported(tiny, tmp_path):
    uri = str(tmp_path / "store")
    _worker(tiny, uri).run_shard("r1", PROMPTS[:1], JOB)
    before = _kl_table(uri)
    script = (
        "import os, pyarrow as pa\n"
        "from klstore.store import open_store, KL_SCHEMA\n"
        "os.replace = lambda *a: os._exit(9)  # die between the write and the rename\n"
        f"store = open_store({uri!r})\n"
        "rows = pa.table({n: pa.nulls(3, f.type) for n, f in zip(KL_SCHEMA.names, KL_SCHEMA)})\n"
        "store.write('kl', rows, 'part-crash.parquet', model='tiny-llama', probe='skip', run_id='r1')\n"
    )
    crashed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert crashed.returncode == 9, crashed.stderr
    store = open_store(uri)
    leftovers = [p for p in store.files("kl", suffix="") if ".tmp-" in p]
    assert len(leftovers) == 1
    assert _kl_table(uri) == before
    problems = upkeep.verify(store)["problems"]
    assert problems["temporary"] == leftovers and not problems["bad"] and not problems["duplicates"]
    assert main(["verify", "--store", uri]) == 1
    os.unlink(leftovers[0])
    assert main(["verify", "--store", uri]) == 0


def test_verify_reports_unreadable_and_duplicates(tiny, tmp_path):
    uri = str(tmp_path / "store")
    _worker(tiny, uri).run_shard("r1", PROMPTS[:1], JOB)
    store = open_store(uri)
    kl_file = store.files("kl")[0]
    folder = os.path.dirname(kl_file)
    pq.write_table(pq.read_table(kl_file, partitioning=None), os.path.join(folder, "copy.parquet"))
    with open(os.path.join(folder, "broken.parquet"), "wb") as handle:
        handle.write(b"not parquet at all")
    result = upkeep.verify(store)
    problems = result["problems"]
    assert len(problems["bad"]) == 1 and "broken.parquet" in problems["bad"][0]
    assert problems["duplicates"][0].startswith("kl:")
    n_rows = pq.read_metadata(kl_file).num_rows
    assert result["duplicate_rows"] == n_rows  # every row of the copy, counted exactly


def test_compact_keeps_every_query_result(tiny, tmp_path):
    uri = str(tmp_path / "store")
    worker = _worker(tiny, uri)
    for i in range(len(PROMPTS)):
        worker.run_shard("r1", PROMPTS[i : i + 1], JOB)
    store = open_store(uri)
    queries = [
        "SELECT * FROM kl ORDER BY ALL",
        "SELECT * FROM generations ORDER BY ALL",
        "SELECT * FROM prompts ORDER BY ALL",
        "SELECT * FROM runs ORDER BY ALL",
    ]
    aggregate = "SELECT layer, gen_idx, avg(kl), avg(js) FROM kl GROUP BY ALL ORDER BY ALL"
    before = [views.sql(uri, q) for q in queries]
    before_agg = views.sql(uri, aggregate)[1]
    files_before = len(store.files("kl"))
    assert main(["compact", "--store", uri]) == 0
    assert [views.sql(uri, q) for q in queries] == before
    after_agg = views.sql(uri, aggregate)[1]  # float sums may be added in another order
    assert [r[:2] for r in after_agg] == [r[:2] for r in before_agg]
    np.testing.assert_allclose([r[2:] for r in after_agg], [r[2:] for r in before_agg], rtol=1e-12)
    assert len(store.files("kl")) == 2 < files_before
    assert not any(upkeep.verify(store)["problems"].values())


def test_older_schema_files_stay_readable(tiny, tmp_path):
    uri = str(tmp_path / "store")
    _worker(tiny, uri).run_shard("r1", PROMPTS[:1], JOB)
    folder = tmp_path / "store" / "kl" / "model=old" / "probe=logit_lens" / "run_id=r0"
    folder.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "prompt_id": ["x"],
                "prompt_group": ["g"],
                "layer": pa.array([0], pa.int16()),
                "gen_idx": pa.array([0], pa.int16()),
                "kl": pa.array([1.5], pa.float32()),
                "top1_match": [True],
            }
        ),
        folder / "part-old.parquet",
    )
    _, rows = views.sql(uri, "SELECT kl, js, n_layers FROM kl WHERE model = 'old'")
    assert rows == [(1.5, None, None)]
    merged = upkeep.compact(open_store(uri), min_files=1)
    assert merged
    assert views.sql(uri, "SELECT kl, js, n_layers FROM kl WHERE model = 'old'")[1] == [(1.5, None, None)]


def test_print_views_work_in_plain_duckdb(tiny, tmp_path, capsys):
    uri = str(tmp_path / "store")
    _worker(tiny, uri).run_shard("r1", PROMPTS[:2], JOB)
    assert main(["sql", "--print-views", "--store", uri]) == 0
    statements = capsys.readouterr().out
    con = duckdb.connect()
    con.execute(statements)
    assert con.execute("SELECT count(*) FROM kl").fetchone()[0] == 2 * 2 * 4 * 4
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 0  # the worker writes no run row


def test_sql_formats(tiny, tmp_path, capsys):
    uri = str(tmp_path / "store")
    _worker(tiny, uri).run_shard("r1", PROMPTS[:1], JOB)
    q = "SELECT layer, count(*) AS n FROM kl WHERE probe = 'skip' GROUP BY layer ORDER BY layer"
    assert main(["sql", q, "--store", uri, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["layer,n", "0,4", "1,4", "2,4", "3,4"]
    assert main(["sql", q, "--store", uri, "--format", "json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)[0] == {"layer": 0, "n": 4}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sql", "SELEC 1"], "SQL error: Parser Error"),
        (["sql", "SELECT nope FROM kl"], "SQL error: Binder Error"),
        (["sql", "SELECT 1", "--format", "xml"], "unknown --format 'xml'"),
    ],
)
def test_sql_bad_input(tiny, tmp_path, capsys, argv, message):
    uri = str(tmp_path / "store")
    _worker(tiny, uri).run_shard("r1", PROMPTS[:1], JOB)
    assert main(argv + ["--store", uri]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_store_is_not_created(tmp_path, capsys):
    missing = tmp_path / "nothing-here"
    for argv in (["sql", "SELECT 1"], ["runs"], ["verify"], ["compact"]):
        assert main(argv + ["--store", str(missing)]) == 2
        assert f"store {missing} does not exist" in capsys.readouterr().err
    assert not missing.exists()


def test_store_bad_input_leaves_store_untouched(tmp_path):
    from conftest import run_cli

    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = run_cli("compute", "--model", "smollm2-135m", "--prompt", "hi", "--store", blocker / "store")
    assert out.returncode == 2 and "cannot create store" in out.stderr and "Traceback" not in out.stderr
    store = tmp_path / "store"
    for label, message in [
        ("../x", "model label '../x' cannot name a store folder"),
        ("a/b", "model label 'a/b' cannot name a store folder"),
    ]:
        out = run_cli("compute", "--model", "smollm2-135m", "--prompt", "hi", "--store", store, "--label", label)
        assert out.returncode == 2 and message in out.stderr
    out = run_cli("compute", "--model", "smollm2-135m", "--prompt", "hi", "--store", store, "--run", "/")
    assert out.returncode == 2 and "run name '/' cannot name a store folder" in out.stderr
    assert not store.exists()


def test_sql_cookbook_queries_run(tiny, tmp_path):
    """The SQL cookbook's example queries (docs/sql.md) run against a real store of two models,
    and answer per model."""

    from conftest import REPO

    text = (REPO / "docs" / "sql.md").read_text()
    block = text.split("Queries users want")[1].split("```sql")[1].split("```")[0]
    statements = [s.strip() for s in block.split(";") if s.strip()]
    assert len(statements) == 7
    uri = str(tmp_path / "store")
    prompts = [Prompt("fact-01", PROMPTS[0].text, PROMPTS[0].group), *PROMPTS[1:]]  # the id example 6 names
    for label in ("smollm2-135m", "other-model"):  # smollm2-135m: the label example 1 names
        Worker("tiny", label, uri, loaded=tiny).run_shard("r1", prompts, JOB)
    results = {}
    for number, statement in enumerate(statements, 1):
        names, rows = views.sql(uri, statement)
        assert rows, statement
        results[number] = [dict(zip(names, row)) for row in rows]
    # 2: at most three layers per (model, group), both models present
    per = {}
    for row in results[2]:
        per.setdefault((row["model"], row["prompt_group"]), []).append(row["layer"])
    assert {m for m, _ in per} == {"smollm2-135m", "other-model"} and all(len(v) == 3 for v in per.values())
    assert {r["model"] for r in results[4]} == {"smollm2-135m", "other-model"} and len(results[4]) == 10
    assert {(r["model"], r["rank"]) for r in results[6]} == {
        (m, k) for m in ("smollm2-135m", "other-model") for k in (1, 2, 3)
    }
    assert all(0 <= r["deep_thinking_ratio"] <= 1 for r in results[7])


def test_noise_floor_is_measured_once_per_worker_and_recorded(tiny, tmp_path):
    """The shard's first prompt again, alone: |batched - alone| over every cell (fp32 on CPU: tiny,
    but measured). Recorded on that attempt's shards row, and as the run's max on completion."""
    from klstore.run.plan import RunPlan, execute_local
    from klstore.spec import ExperimentConfig, ModelConfig

    uri = str(tmp_path / "store")
    cfg = ExperimentConfig(
        name="floor",
        store=uri,
        models=(ModelConfig(name="tiny", label="tiny-llama"),),
        prompt_paths=(),
        compute=JOB,
        shard_size=3,
        prompts=tuple(PROMPTS),
    )
    plan = RunPlan(cfg)
    worker = _worker(tiny, plan.store)
    execute_local(plan, worker, say=lambda m: None)
    _, shards = views.sql(uri, "SELECT prompts, noise_floor FROM shards ORDER BY noise_floor NULLS LAST")
    assert [s[0] for s in shards] == [3, 2] or [s[0] for s in shards] == [2, 3]
    floors = [s[1] for s in shards if s[1] is not None]
    assert len(floors) == 1 and 0 <= floors[0] < 1e-4
    # the same prompt alone vs in its batch, recomputed here independently
    engine = Engine(tiny)
    batched = engine.run_many(PROMPTS[:3], list(JOB.probes), "all", JOB.divergences, JOB.generation)[0]
    alone = engine.run_many(PROMPTS[:1], list(JOB.probes), "all", JOB.divergences, JOB.generation, batch_size=1)[0]
    expected = max(
        float(np.nanmax(np.abs(b.values[d].astype(np.float64) - a.values[d])))
        for b, a in zip(batched, alone)
        for d in JOB.divergences
    )
    assert floors[0] == pytest.approx(expected, abs=1e-9)
    _, runs = views.sql(uri, "SELECT status, noise_floor FROM runs")
    assert runs == [("completed", pytest.approx(floors[0]))]
