"""The worker's `tokens` file: written once per vocabulary, and a worker whose tokenizer
fingerprint is already on the store's file does not decode the vocabulary again."""

import copy

import pyarrow.parquet as pq
import pytest
import transformers
from store_helpers import JOB, PROMPTS
from tiny_models import VOCAB, ToyTokenizer, build
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from klstore.core.models import from_objects
from klstore.run.worker import TOKENIZER_KEY, Worker, tokenizer_fingerprint
from klstore.store import views


def fast_tokenizer(first: int = 32) -> transformers.PreTrainedTokenizerFast:
    """A character-level fast tokenizer of VOCAB ids (id 0: EOS); `first` shifts every token's text."""
    vocab = {"<eos>": 0, **{chr(first + i): i for i in range(1, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@pytest.fixture(scope="module")
def model():
    return build("llama")


def counted_worker(model, tokenizer, uri, calls):
    """A worker whose engine counts its vocabulary decodes into `calls`."""
    worker = Worker("tiny", "tiny-llama", uri, loaded=from_objects("tiny", model, tokenizer))
    decode = worker.engine.vocabulary
    worker.engine.vocabulary = lambda: calls.append(1) or decode()
    return worker


def token_files(uri):
    return sorted((uri / "tokens" / "model=tiny-llama").glob("*.parquet"))


def stored_vocabulary(uri):
    _, rows = views.sql(str(uri), "SELECT token_text FROM tokens ORDER BY token_id")
    return [r[0] for r in rows]


def test_second_worker_does_not_decode(model, tmp_path):
    uri, calls = tmp_path / "store", []
    counted_worker(model, fast_tokenizer(), str(uri), calls).run_shard("r1", PROMPTS[:1], JOB)
    assert len(calls) == 1
    (first,) = token_files(uri)
    counted_worker(model, fast_tokenizer(), str(uri), calls).run_shard("r1", PROMPTS[1:2], JOB)
    assert len(calls) == 1  # the fingerprint on the file vouched for it
    assert token_files(uri) == [first]
    assert stored_vocabulary(uri) == fast_tokenizer().batch_decode([[i] for i in range(VOCAB)])


def test_changed_tokenizer_rewrites_the_file(model, tmp_path):
    uri, calls = tmp_path / "store", []
    counted_worker(model, fast_tokenizer(), str(uri), calls).run_shard("r1", PROMPTS[:1], JOB)
    (old,) = token_files(uri)
    changed = fast_tokenizer(first=40)
    counted_worker(model, changed, str(uri), calls).run_shard("r1", PROMPTS[1:2], JOB)
    assert len(calls) == 2
    (new,) = token_files(uri)
    assert new != old and not (old.parent / (old.name + ".sha256.json")).exists()
    assert stored_vocabulary(uri) == changed.batch_decode([[i] for i in range(VOCAB)])


def test_file_without_fingerprint_is_decoded_once_then_marked(model, tmp_path):
    """A tokens file from before fingerprints (same texts): decoded once, rewritten with the mark."""
    uri, calls = tmp_path / "store", []
    counted_worker(model, fast_tokenizer(), str(uri), calls).run_shard("r1", PROMPTS[:1], JOB)
    (path,) = token_files(uri)
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata(None), path)  # as an older klstore wrote it
    for prompts in (PROMPTS[1:2], PROMPTS[2:3]):
        counted_worker(model, fast_tokenizer(), str(uri), calls).run_shard("r1", prompts, JOB)
    assert len(calls) == 2  # the first worker decoded (no mark), the second did not
    assert token_files(uri) == [path]
    assert pq.read_schema(path).metadata[TOKENIZER_KEY.encode()]


def test_no_fingerprint_means_decode_every_time(model, tmp_path):
    """A tokenizer that is not a plain fast one (here the toy) gives no fingerprint: each worker decodes."""
    uri, calls = tmp_path / "store", []
    for prompts in (PROMPTS[:1], PROMPTS[1:2]):
        counted_worker(model, ToyTokenizer(), str(uri), calls).run_shard("r1", prompts, JOB)
    assert len(calls) == 2
    assert len(token_files(uri)) == 1
    assert stored_vocabulary(uri) == [ToyTokenizer().decode([i]) for i in range(VOCAB)]


def test_fingerprint_follows_what_decoding_reads(model):
    def mark(tokenizer, head=model):
        return tokenizer_fingerprint(from_objects_engine(head, tokenizer))

    base = mark(fast_tokenizer())
    assert base is not None and base == mark(fast_tokenizer())
    assert mark(fast_tokenizer(first=40)) != base  # different token texts
    cleaned = fast_tokenizer()
    cleaned.clean_up_tokenization_spaces = not cleaned.clean_up_tokenization_spaces
    assert mark(cleaned) != base

    class OwnDecode(transformers.PreTrainedTokenizerFast):
        def _decode(self, token_ids, **kwargs):
            return "x"

    assert mark(OwnDecode(tokenizer_object=fast_tokenizer().backend_tokenizer, eos_token="<eos>")) is None
    assert mark(ToyTokenizer()) is None


def test_fingerprint_covers_the_head_size(model):
    padded = copy.deepcopy(model)
    padded.resize_token_embeddings(VOCAB + 32)  # a head with rows past the tokenizer's ids
    assert tokenizer_fingerprint(from_objects_engine(padded, fast_tokenizer())) != tokenizer_fingerprint(
        from_objects_engine(model, fast_tokenizer())
    )


def from_objects_engine(model, tokenizer):
    from klstore.core.engine import Engine

    return Engine(from_objects("tiny", model, tokenizer))
