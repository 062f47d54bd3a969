"""The lens-fitting corpus (klstore/core/corpus.py): reading each source kind, packing exactly,
the held-out split, split hashes, and the shipped self-distilled corpus as a file.

The tokenizer is a real Hugging Face fast tokenizer over a hand-built word vocabulary
("w0".."w19" -> ids 3..22, split on whitespace), so every expected id is read off the text.
The shipped corpus packed with SmolLM2's own tokenizer is in tests/integration/test_self_corpus.py.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import types
from pathlib import Path

import pytest
import torch

from klstore.core.corpus import Corpus, CorpusError, load_corpus, pack, prepends_bos, read_texts
from klstore.errors import KlstoreError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "jobs" / "corpus" / "smollm2-self.jsonl"
UNK, BOS, EOS = 0, 1, 2


def word(i: int) -> int:
    """The id of word "w<i>"."""
    return 3 + i


def make_tokenizer(bos: bool):
    """A WordLevel fast tokenizer; with `bos`, a plain encode prepends <s> (as Llama's does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": UNK, "<s>": BOS, "</s>": EOS} | {f"w{i}": word(i) for i in range(20)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def plain():
    return make_tokenizer(bos=False)


@pytest.fixture(scope="module")
def with_bos():
    return make_tokenizer(bos=True)


DOCS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"]


# ------------------------------------------------------------------------------------- reading
def test_txt_file_is_one_document(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Chapter one.\n\nA paragraph.\n\n\nAnother.\n")
    assert read_texts(str(path)) == ["Chapter one.\n\nA paragraph.\n\n\nAnother.\n"]


def test_folder_reads_txt_files_in_sorted_order(tmp_path):
    for name, text in {
        "b.txt": "second",
        "a.txt": "first",
        "c.txt": "  \n",
        "d.md": "not text",
        "e.txt": "third",
    }.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "0.txt").write_text("not read")
    assert read_texts(str(tmp_path)) == ["first", "second", "third"]
    assert read_texts(str(tmp_path), max_documents=2) == ["first", "second"]


def test_jsonl_reads_the_text_field_skipping_blank_lines_and_documents(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"text": "one", "id": 1}, {"text": "   "}, {"text": "two"}, {"text": "three"}]
    path.write_text(
        "\n".join(json.dumps(row) for row in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:])
    )
    assert read_texts(str(path)) == ["one", "two", "three"]
    assert read_texts(str(path), max_documents=2) == ["one", "two"]
    other = tmp_path / "d.jsonl"
    other.write_text(json.dumps({"body": "b", "text": 3}) + "\n")
    assert read_texts(str(other), text_field="body") == ["b"]


def test_jsonl_stops_reading_at_max_documents(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\nnot json\n')
    assert read_texts(str(path), max_documents=2) == ["one", "two"]


def _write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, dict):
        path.mkdir()
        for child, text in content.items():
            (path / child).write_text(text)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.jsonl", None, "corpus file not found: {path}"),
        ("missing.txt", None, "corpus file not found: {path}"),
        ("c.jsonl", '{"text": "ok"}\n\n{"text": "ok", }\n', "{path} line 3: invalid JSON"),
        ("c.jsonl", '{"text": "ok"}\n{"body": "no text"}\n', "{path} line 2: no 'text' field"),
        ("c.jsonl", '{"text": ["a", "list"]}\n', "{path} line 1: field 'text' is list, not a string"),
        ("c.jsonl", '{"text": null}\n', "{path} line 1: field 'text' is NoneType, not a string"),
        ("c.jsonl", '["text"]\n', "{path} line 1: expected a JSON object"),
        ("c.jsonl", "", "corpus {path} is empty"),
        ("c.jsonl", '{"text": ""}\n\n{"text": " \\n"}\n', "corpus {path} is empty"),
        ("c.txt", " \n\n ", "corpus {path} is empty"),
        ("d", {"a.txt": "", "b.txt": "\n"}, "corpus {path} is empty"),
        ("d", {"a.md": "text"}, "corpus folder {path} has no .txt files"),
        ("c.csv", "text\n", "corpus file {path}: use a .txt or .jsonl file"),
    ],
)
def test_read_errors_are_one_line_naming_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name if content is None else _write(tmp_path, name, content)
    with pytest.raises(CorpusError) as info:  # a KlstoreError: the CLI prints it as one line
        read_texts(str(path))
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(message.format(path=path)), text


def test_max_documents_must_be_positive(tmp_path):
    with pytest.raises(KlstoreError, match="max_documents must be at least 1, got 0"):
        read_texts(str(_write(tmp_path, "c.txt", "text")), max_documents=0)


def test_dataset_name_goes_to_datasets_load_dataset(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"text": "a"}, {"text": ""}, {"text": "b"}, {"text": "c"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert read_texts("owner/set", max_documents=2) == ["a", "b"]
    assert read_texts("wikitext:wikitext-2-raw-v1", dataset_split="validation") == ["a", "b", "c"]
    assert calls == [("owner/set", None, "train"), ("wikitext", "wikitext-2-raw-v1", "validation")]


def test_dataset_errors(monkeypatch):
    def broken(*args, **kwargs):
        raise FileNotFoundError("Dataset 'nope/nope' doesn't exist on the Hub\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=broken))
    with pytest.raises(KlstoreError, match=r"^cannot load Hugging Face dataset 'nope/nope' \(split 'train'\): Dataset"):
        read_texts("nope/nope")
    rows = types.SimpleNamespace(load_dataset=lambda *a, **k: [{"text": "a"}, {"content": "b"}])
    monkeypatch.setitem(sys.modules, "datasets", rows)
    with pytest.raises(KlstoreError, match=r"^dataset owner/set row 1: no 'text' field$"):
        read_texts("owner/set")


def test_missing_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(KlstoreError) as info:
        read_texts("owner/set")
    assert "\n" not in str(info.value)
    assert str(info.value).endswith("needs the datasets package: pip install datasets")


# ------------------------------------------------------------------------------------- packing
def test_pack_joins_documents_with_eos_and_cuts_exact_sequences(plain):
    assert not prepends_bos(plain)
    stream = [word(1), word(2), word(3), EOS, word(4), word(5), EOS, word(6), word(7), word(8), word(9)]
    corpus = pack(DOCS, plain, seq_len=3, held_out=1, source="docs")
    assert corpus.train.dtype == corpus.held_out.dtype == torch.int64
    assert corpus.train.tolist() == [stream[0:3], stream[3:6]]
    assert corpus.held_out.tolist() == [stream[6:9]]  # stream[9:] (2 tokens) is dropped
    assert (corpus.seq_len, corpus.n_train_tokens, corpus.n_held_out_tokens, corpus.source) == (3, 6, 3, "docs")


def test_pack_prepends_bos_to_each_document_when_the_tokenizer_does(with_bos):
    assert prepends_bos(with_bos)
    stream = [BOS, word(1), word(2), word(3), EOS, BOS, word(4), word(5), EOS, BOS, word(6), word(7)]
    corpus = pack(DOCS, with_bos, seq_len=4, held_out=0)
    assert corpus.train.tolist() == [stream[0:4], stream[4:8], stream[8:12]]
    assert corpus.held_out.shape == (0, 4)


def test_a_bos_token_alone_is_not_prepended():
    class HasBosButDoesNotAddIt:  # SmolLM2: bos_token <|im_start|>, never added by an encode
        bos_token_id, eos_token_id = 9, 0

        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [[1 + int(c) if c.isdigit() else 5 for c in text.split()] for text in texts]}

    corpus = pack(["1 2", "3"], HasBosButDoesNotAddIt(), seq_len=2, held_out=0)
    assert corpus.train.tolist() == [[2, 3], [0, 4]]


def test_sequences_are_consecutive_non_overlapping_cuts_of_the_stream(plain):
    docs = [" ".join(f"w{(7 * d + i) % 20}" for i in range(1 + d % 5)) for d in range(40)]
    ids = [plain([doc], add_special_tokens=False)["input_ids"][0] for doc in docs]
    stream = sum(([EOS] + x for x in ids[1:]), list(ids[0]))
    for seq_len in (2, 5, 16):
        corpus = pack(docs, plain, seq_len=seq_len, held_out=2)
        both = torch.cat([corpus.train, corpus.held_out])
        n = len(stream) // seq_len
        assert both.shape == (n, seq_len)
        assert both.flatten().tolist() == stream[: n * seq_len]


def test_empty_documents_add_no_separator(plain):
    assert pack(["w1 w2", "", "  ", "w3 w4"], plain, seq_len=5, held_out=0).train.tolist() == [
        [word(1), word(2), EOS, word(3), word(4)]
    ]


def test_held_out_is_the_last_sequences_and_caps_never_move_it(plain):
    docs = [" ".join(f"w{i % 20}" for i in range(d, d + 6)) for d in range(20)]
    full = pack(docs, plain, seq_len=4, held_out=3)
    every = torch.cat([full.train, full.held_out])
    assert torch.equal(full.held_out, every[-3:])
    for cap in (1, 5, 10_000):
        capped = pack(docs, plain, seq_len=4, held_out=3, max_train_sequences=cap)
        assert torch.equal(capped.held_out, full.held_out)
        assert torch.equal(capped.train, full.train[:cap])
        assert capped.split_hash("held_out") == full.split_hash("held_out")
    longer = pack([*docs, "w1 w2 w3 w4 w5 w6 w7 w8"], plain, seq_len=4, held_out=0)
    assert torch.equal(longer.train[: len(every)], every)  # appending documents only adds at the end


@pytest.mark.parametrize(
    "texts, seq_len, held_out, cap, message",
    [
        (DOCS, 1, 0, None, "seq_len must be at least 2, got 1"),
        (DOCS, 3, -1, None, "held_out must be 0 or more sequences, got -1"),
        (DOCS, 3, 0, 0, "max_train_sequences must be at least 1, got 0"),
        ([], 3, 0, None, "corpus src is empty: no non-blank documents"),
        (["", " \n"], 3, 0, None, "corpus src is empty: no non-blank documents"),
        (["w1 w2", "w3"], 5, 0, None, "corpus src has 4 tokens, fewer than one sequence of 5"),
        (DOCS, 3, 3, None, "corpus src packs into 3 sequence(s) of 3 tokens; held_out=3 needs at least 4"),
    ],
)
def test_pack_errors_are_one_line(plain, texts, seq_len, held_out, cap, message):
    with pytest.raises(CorpusError) as info:
        pack(texts, plain, seq_len, held_out, max_train_sequences=cap, source="src")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(message), str(info.value)


def test_pack_needs_an_eos_token():
    class NoEos:
        bos_token_id = eos_token_id = None

        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [[1, 2] for _ in texts]}

    with pytest.raises(KlstoreError, match="tokenizer has no EOS token"):
        pack(["a", "b"], NoEos(), seq_len=2, held_out=0)


def test_load_corpus_reads_packs_and_records_the_source_without_home(tmp_path, monkeypatch, plain):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = _write(tmp_path, "c.jsonl", "".join(json.dumps({"body": doc}) + "\n" for doc in DOCS))
    corpus = load_corpus(str(path), plain, seq_len=3, held_out=1, text_field="body", max_documents=3)
    assert corpus.source == "~/c.jsonl text_field=body max_documents=3"
    assert torch.equal(corpus.train, pack(DOCS, plain, seq_len=3, held_out=1).train)


# ------------------------------------------------------------------------------------- hashing
def _expected_hash(rows: list[list[int]]) -> str:
    """The definition, written out: shape line, then each id as int64 little endian."""
    head = f"int64 {len(rows)}x{len(rows[0]) if rows else 0}\n".encode()
    return hashlib.sha256(head + b"".join(struct.pack("<q", v) for row in rows for v in row)).hexdigest()


def _corpus(train, held_out=None, seq_len=None):
    train = torch.tensor(train, dtype=torch.int64)
    width = train.shape[1] if seq_len is None else seq_len
    held = torch.zeros((0, width), dtype=torch.int64) if held_out is None else torch.tensor(held_out)
    return Corpus(train=train, held_out=held)


def test_split_hash_is_the_documented_definition():
    rows = [[0, 1, 2**40, 49151], [2**63 - 1, 7, 8, 9]]
    corpus = _corpus(rows, [[5, 6, 7, 8]])
    assert corpus.split_hash("train") == _expected_hash(rows)
    assert corpus.split_hash("held_out") == _expected_hash([[5, 6, 7, 8]])
    assert (
        Corpus(torch.zeros((0, 4), dtype=torch.int64), torch.zeros((0, 4), dtype=torch.int64)).split_hash("train")
        == hashlib.sha256(b"int64 0x4\n").hexdigest()
    )


def test_split_hash_depends_only_on_the_ids_and_shape(plain):
    a = pack(DOCS * 4, plain, seq_len=3, held_out=2)
    b = pack(list(DOCS * 4), make_tokenizer(bos=False), seq_len=3, held_out=2, source="elsewhere")
    assert a.split_hash("train") == b.split_hash("train")
    assert a.split_hash("held_out") == b.split_hash("held_out")
    wide = torch.arange(24, dtype=torch.int64).view(4, 6)
    view = Corpus(wide[:, ::2], torch.zeros((0, 3), dtype=torch.int64))  # not contiguous
    copy = Corpus(wide[:, ::2].clone(), torch.zeros((0, 3), dtype=torch.int64))
    assert view.split_hash("train") == copy.split_hash("train")


def test_one_changed_token_or_another_shape_changes_the_hash():
    rows = [[3, 4, 5, 6], [7, 8, 9, 10]]
    base = _corpus(rows).split_hash("train")
    for r in range(2):
        for c in range(4):
            changed = [list(row) for row in rows]
            changed[r][c] += 1
            assert _corpus(changed).split_hash("train") != base
    assert _corpus([[3, 4], [5, 6], [7, 8], [9, 10]], seq_len=2).split_hash("train") != base  # same ids, 4x2


def test_corpus_checks_its_tensors():
    with pytest.raises(KlstoreError, match="corpus train must be a 2-D int64 tensor"):
        Corpus(torch.zeros((2, 3), dtype=torch.int32), torch.zeros((0, 3), dtype=torch.int64))
    with pytest.raises(KlstoreError, match="seq_len: train 3, held_out 4"):
        Corpus(torch.zeros((2, 3), dtype=torch.int64), torch.zeros((1, 4), dtype=torch.int64))
    with pytest.raises(KlstoreError, match="unknown corpus split 'test'"):
        _corpus([[1, 2]]).split_hash("test")


# ------------------------------------------------------------------------------ shipped corpus
def test_shipped_self_corpus_is_a_small_valid_jsonl():
    assert SHIPPED.stat().st_size < 400_000
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    assert all(list(json.loads(line)) == ["text"] for line in lines)
    texts = read_texts(str(SHIPPED))
    assert len(texts) == len(lines) >= 200
    assert sum(len(text) for text in texts) > 100_000  # ~45k tokens; the exact count is an integration test
