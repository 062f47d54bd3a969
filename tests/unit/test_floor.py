"""report.floor.load on a constructed store (no model): each (model, run) pair's floor is the
largest of its own shards' noise floors, the run's floor only for a run none of whose shards
recorded one, and None where neither is there; checked against plain Python over what was written."""

import math
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from klstore.report import floor
from klstore.report.aggregate import Filter
from klstore.run.records import attempt_file_name, shard_attempt_row
from klstore.store import open_store, views
from klstore.store.tables import KL_SCHEMA

NAN = float("nan")
# (model, run) -> noise_floor of each of its shard attempts ("old": a file from before the column)
SHARDS = {
    ("a", "r1"): [1e-6, None, 3e-6],  # two workers measured: the larger counts
    ("b", "r1"): [None],  # its workers measured nothing: not a's floor of the same run
    ("a", "r2"): [None, None],  # no shard of r2 measured: the run's floor
    ("c", "r4"): ["old"],  # shards from before shards.noise_floor: the run's floor
    ("d", "r5"): [NAN, 2e-6],  # a non-finite value is no floor
}
RUNS = {"r1": 3e-6, "r2": 0.5, "r3": None, "r4": 0.25, "r5": 7.0, "r6": 0.125}
KL = [("a", "r1"), ("b", "r1"), ("a", "r2"), ("c", "r3"), ("c", "r4"), ("d", "r5"), ("e", "r6")]


def f32(value):
    """As the store keeps it (float32)."""
    return None if value is None else float(pa.scalar(value, pa.float32()).as_py())


def plain(pairs) -> dict:
    """The rule, in plain Python over SHARDS and RUNS."""

    def measured(model, run):
        found = [f32(v) for v in SHARDS.get((model, run), []) if isinstance(v, float) and math.isfinite(v)]
        return max(found) if found else None

    out = {}
    for model, run in pairs:
        run_measured = any(measured(m, r) is not None for m, r in SHARDS if r == run)
        out[(model, run)] = measured(model, run) if run_measured else f32(RUNS.get(run))
    return out


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("floor") / "store")
    store = open_store(uri, create=True)
    for model, run in KL:
        rows = pa.Table.from_pylist(
            [
                {
                    "prompt_id": "p0",
                    "prompt_group": "g",
                    "layer": layer,
                    "gen_idx": 0,
                    "kl": 0.1 * layer,
                    "top1_match": True,
                    "n_layers": 2,
                }
                for layer in (0, 1)
            ],
            schema=KL_SCHEMA,
        )
        store.write("kl", rows, "part-x.parquet", model=model, probe="logit_lens", run_id=run)
    now = datetime.now(timezone.utc)
    for (model, run), values in SHARDS.items():
        for i, value in enumerate(values):
            row = shard_attempt_row(
                f"k{i}",
                {"node": "n", "actor": "local", "device": "cpu"},
                now,
                now,
                2,
                4,
                "ok",
                noise_floor=None if value == "old" else value,
            )
            path = store.write("shards", row, attempt_file_name(f"k{i}"), model=model, run_id=run)
            if value == "old":
                pq.write_table(pq.read_table(path, partitioning=None).drop_columns(["noise_floor"]), path)
    for run, value in RUNS.items():
        store.write_run(run, run, "completed", {}, {}, noise_floor=value)
    return uri


def test_each_pair_answers_to_its_own_shards_then_its_run(uri):
    loaded = floor.load(views.connect(uri), Filter()).runs
    assert loaded == pytest.approx(plain(KL))
    # the cases the constructed store is for, spelled out
    assert loaded[("a", "r1")] == pytest.approx(3e-6) and loaded[("b", "r1")] is None
    assert loaded[("a", "r2")] == 0.5 and loaded[("c", "r4")] == 0.25 and loaded[("c", "r3")] is None
    assert loaded[("d", "r5")] == pytest.approx(2e-6) and loaded[("e", "r6")] == 0.125


def test_the_selection_chooses_the_pairs(uri):
    loaded = floor.load(views.connect(uri), Filter("model = $m", {"m": "a"})).runs
    assert loaded == pytest.approx(plain([("a", "r1"), ("a", "r2")]))


def test_per_model_is_the_largest_over_its_runs(uri):
    per_model = floor.load(views.connect(uri), Filter()).per_model()
    assert per_model == {
        "a": (0.5, 2, 2),
        "b": (None, 0, 1),
        "c": (0.25, 1, 2),
        "d": (pytest.approx(2e-6), 1, 1),
        "e": (0.125, 1, 1),
    }
    line = floor.summary_line(floor.load(views.connect(uri), Filter()))
    assert line.startswith("Noise floor: a 0.5 nats, b not measured, c 0.25 nats (measured in 1 of 2 runs), ")
