"""What the export/import tests share: a store holding two runs of a tiny Llama, one of them read
through the logit lens and a tuned lens kept in the store, with hostile strings where users put them."""

from __future__ import annotations

import pyarrow.parquet as pq
import torch
from tiny_models import ToyTokenizer, build

from klstore.core import lenses
from klstore.core.models import from_objects
from klstore.run import lenses as run_lenses
from klstore.run.plan import RunPlan, execute_local
from klstore.run.worker import Worker
from klstore.spec import ComputeSpec, ExperimentConfig, GenerationSpec, ModelConfig, ProbeSpec, Prompt
from klstore.store import open_store, views
from klstore.store.dataset import RUN_TABLES
from klstore.store.integrity import visible

HOSTILE = 'x"\n---\nkey: <script>alert(1)</script> | *bold* [a](b) \u2028--- \\ `tick`'
PROMPTS = tuple(
    Prompt(f"q{i}", f"prompt {i} says {HOSTILE if i == 1 else ''}", group=HOSTILE if i % 2 else "plain")
    for i in range(5)
)


def tiny_llama():
    return from_objects("tiny", build("llama"), ToyTokenizer())


def make_store(tiny, root) -> tuple[str, str, str]:
    """A store with a tuned lens and two runs; returns (store uri, exported run id, other run id)."""
    uri = str(root / "store")
    store = open_store(uri, create=True)
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 32, 32, generator=generator) * 0.05
    bias = torch.randn(4, 32, generator=generator) * 0.3
    weight[-1], bias[-1] = 0.0, 0.0
    lens = lenses.AffineLens("tuned", weight, bias)
    run_lenses.put(store, lenses.save(lens, root / "lens"), lens.id)
    ids = []
    for name, compute in (
        (
            "export-me",
            ComputeSpec(
                (ProbeSpec("logit_lens"), ProbeSpec("skip")),
                "0,2-3",
                ("kl", "js"),
                GenerationSpec(3),
                lens=("logit", lens.id),
            ),
        ),
        ("other", ComputeSpec((ProbeSpec("logit_lens"),), "all", ("kl",), GenerationSpec(2))),
    ):
        config = ExperimentConfig(
            name=name,
            store=uri,
            models=(ModelConfig(name=f"tiny {HOSTILE}", label="tiny"),),
            prompt_paths=(),
            compute=compute,
            shard_size=2,
            source="test",
            prompts=PROMPTS,
        )
        plan = RunPlan(config)
        execute_local(plan, Worker("tiny", "tiny", plan.store, loaded=tiny), say=lambda m: None)
        ids.append(plan.run_id)
    return uri, ids[0], ids[1]


def run_rows(uri: str, run_id: str) -> dict[str, list]:
    """Every view row of the run, per table, in a fixed order (and the tokens of its models)."""
    out = {}
    for table in RUN_TABLES:
        _, rows = views.sql(uri, f"SELECT * FROM {table} WHERE run_id = ? ORDER BY ALL", [run_id])
        out[table] = rows
    _, out["tokens"] = views.sql(
        uri, "SELECT * FROM tokens WHERE model IN (SELECT model FROM prompts WHERE run_id = ?) ORDER BY ALL", [run_id]
    )
    return out


def run_files(uri: str, run_id: str) -> dict[str, tuple]:
    """Each store file of the run (store-relative path) -> (its Arrow table, the shards of its record)."""
    from klstore.store.integrity import read_record

    store = open_store(uri)
    out = {}
    for table in (*RUN_TABLES, "tokens"):
        for path in visible(store, table):
            if table != "tokens" and f"/run_id={run_id}/" not in path:
                continue
            relative = path[len(store.root.rstrip("/")) + 1 :]
            out[relative] = (pq.read_table(path, partitioning=None), (read_record(store, path) or {}).get("shards"))
    return out
