"""What the store tests share: five prompts in three groups, a two-probe job, a tiny worker,
and the `kl` view's rows in a fixed order."""

from klstore.run.worker import Worker
from klstore.spec import ComputeSpec, GenerationSpec, ProbeSpec, Prompt
from klstore.store import views

PROMPTS = [
    Prompt(f"p{i}", text, group)
    for i, (text, group) in enumerate(
        [
            ("The quick brown fox", "a"),
            ("jumps over the lazy dog", "a"),
            ("Hello world, said", "b"),
            ("One two three four", "b"),
            ("Sphinx of black quartz", "c"),
        ]
    )
]
JOB = ComputeSpec((ProbeSpec("logit_lens"), ProbeSpec("skip")), "all", ("kl", "js"), GenerationSpec(4))


def tiny_worker(loaded, uri):
    return Worker("tiny", "tiny-llama", uri, loaded=loaded)


def kl_rows(uri):
    _, rows = views.sql(
        uri,
        "SELECT run_id, model, probe, prompt_id, prompt_group, layer, gen_idx, "
        "kl, kl_reverse, js, top1_match FROM kl ORDER BY ALL",
    )
    return rows
