"""S3 stores (a moto server on 127.0.0.1): round trips, verify, compaction and its faults."""

import pytest
from faults import Faulty
from store_helpers import JOB, PROMPTS
from store_helpers import kl_rows as _kl_table
from store_helpers import tiny_worker as _worker
from tiny_models import ToyTokenizer, build

from klstore.cli import main
from klstore.core.models import from_objects
from klstore.run.worker import Worker
from klstore.store import open_store, upkeep, views


@pytest.fixture(scope="module")
def tiny():
    return from_objects("tiny", build("llama"), ToyTokenizer())


def test_s3_round_trip(tiny, tmp_path, s3_server):
    uri = "s3://klbucket/experiments/store1"
    worker = _worker(tiny, uri)
    worker.run_shard("r1", PROMPTS[:2], JOB)
    worker.run_shard("r1", PROMPTS[:2], JOB)  # idempotent there too
    local = str(tmp_path / "local")
    _worker(tiny, local).run_shard("r1", PROMPTS[:2], JOB)
    assert _kl_table(uri) == _kl_table(local)
    assert len(_kl_table(uri)) == 2 * 2 * 4 * 4
    store = open_store(uri)
    assert len(store.files("kl")) == 2
    assert not any(upkeep.verify(store)["problems"].values())
    assert main(["compact", "--store", uri]) == 0
    assert _kl_table(uri) == _kl_table(local)


def _totals(uri):
    _, rows = views.sql(uri, "SELECT count(*), round(sum(kl), 4) FROM kl")
    return rows[0]


def test_s3_compaction_fault_at_every_step(tiny, s3_server, monkeypatch):
    """Each file operation of a compaction fails in turn: through klstore every row stays once."""
    base = "s3://klbucket/faults/base"
    for i in range(3):
        _worker(tiny, base).run_shard("r1", PROMPTS[i : i + 1], JOB)
    expected = _totals(base)
    with monkeypatch.context() as patch:
        counter = Faulty(patch, fail_at=-1)
        upkeep.compact(open_store(base))
    assert _totals(base) == expected
    for k in range(1, counter.calls + 1):
        uri = f"s3://klbucket/faults/k{k}"
        for i in range(3):
            _worker(tiny, uri).run_shard("r1", PROMPTS[i : i + 1], JOB)
        with monkeypatch.context() as patch:
            Faulty(patch, fail_at=k)
            with pytest.raises(OSError):
                upkeep.compact(open_store(uri))
        assert _totals(uri) == expected, f"op {k}"
        result = upkeep.verify(open_store(uri))
        assert result["duplicate_rows"] == 0 and not result["problems"]["bad"], f"op {k}"
        assert _totals(uri) == expected, f"op {k}"


def test_report_on_s3_redraws_exactly_when_input_hashes_change(tiny, s3_server, tmp_path):
    import hashlib
    import json

    from klstore.report import site
    from klstore.spec import parse_report_spec
    from klstore.store.integrity import file_sha256

    uri = "s3://klbucket/report/store"
    for i in range(2):
        _worker(tiny, uri).run_shard("r1", PROMPTS[2 * i : 2 * i + 2], JOB)
    spec = parse_report_spec({"name": "s3rep", "per_prompt": 0, "compare_groups": False})
    out = tmp_path / "rep"
    first = site.build(open_store(uri), spec, out=out, log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    store = open_store(uri)
    recorded = {path: digest for files in manifest["input_files"].values() for path, digest in files}
    assert len(recorded) == len(store.files("kl")) == 4
    for path in store.files("kl"):  # the manifest holds each input file's real SHA-256
        assert (
            recorded[path[len(store.root) + 1 :]]
            == file_sha256(store, path)
            == hashlib.sha256(store.read_bytes(path)).hexdigest()
        )
    _worker(tiny, uri).run_shard("r1", PROMPTS[:2], JOB)  # the same shard redone: the same bytes
    again = site.build(open_store(uri), spec, out=out, log=lambda m: None)
    assert again["drawn"] == 0 and not again["changed"]
    other = from_objects("tiny", build("llama"), ToyTokenizer())
    import torch

    with torch.no_grad():
        for param in other.model.parameters():
            param.mul_(1.5)
    Worker("tiny", "tiny-llama", uri, loaded=other).run_shard("r1", PROMPTS[:2], JOB)  # new numbers
    redone = site.build(open_store(uri), spec, out=out, log=lambda m: None)
    assert redone["changed"] and redone["drawn"] == first["drawn"]  # every figure reads that shard
