"""The shipped self-distilled corpus (jobs/corpus/smollm2-self.jsonl, made by
jobs/corpus/make_self_corpus.py) packed with SmolLM2's own tokenizer: enough tokens to fit a
lens at seq_len 128, and a held-out split apart from them."""

from __future__ import annotations

from pathlib import Path

from klstore.core.corpus import load_corpus, prepends_bos

SHIPPED = Path(__file__).resolve().parents[2] / "jobs" / "corpus" / "smollm2-self.jsonl"


def test_shipped_corpus_packs_to_32k_training_tokens(smollm2):
    tokenizer = smollm2.tokenizer
    assert not prepends_bos(tokenizer)  # SmolLM2: documents joined by <|im_end|>, no BOS
    corpus = load_corpus(str(SHIPPED), tokenizer, seq_len=128, held_out=32)
    assert corpus.train.shape[1] == corpus.held_out.shape[1] == 128
    assert corpus.n_train_tokens >= 32_768
    assert corpus.held_out.shape[0] == 32
    assert int(corpus.train.max()) < len(tokenizer) and int(corpus.train.min()) >= 0
    # the same file and tokenizer give the same split, as a lens's provenance records it
    again = load_corpus(str(SHIPPED), tokenizer, seq_len=128, held_out=32)
    assert again.split_hash("train") == corpus.split_hash("train")
    assert again.split_hash("held_out") == corpus.split_hash("held_out") != corpus.split_hash("train")
