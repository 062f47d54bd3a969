"""The token corpus that trained lenses (tuned, least squares) are fitted on and checked against.

Text comes from one of four sources (`read_texts`):

- a `.txt` file: the whole file is ONE document (a blank line is a paragraph break inside a
  book or an article, not a document boundary, so it is never split on);
- a folder: every `*.txt` file in it (not in subfolders), in sorted name order, one document each;
- a `.jsonl` file: one JSON object per line, its `text_field` (default "text") a string; blank
  lines are skipped;
- any other name: a Hugging Face dataset, `name` or `name:config` (e.g. `wikitext:wikitext-2-raw-v1`),
  read with `datasets.load_dataset(name, config, split=dataset_split)`.

Documents that are empty or only whitespace are dropped everywhere.

`pack` turns documents into fixed-length sequences:

    stream = [BOS] d_0  EOS  [BOS] d_1  EOS  ...  EOS  [BOS] d_{n-1}
    sequences = stream[k*seq_len : (k+1)*seq_len]  for k = 0 .. len(stream) // seq_len - 1

- Each document is tokenized with `add_special_tokens=False`; the tokenizer's EOS id goes between
  consecutive documents (not after the last), as tuned-lens's `chunk_and_tokenize` joins them.
- BOS is prepended to every document only when the tokenizer itself prepends one to a plain
  encode (Llama 2/3, Gemma). Having a `bos_token` is not enough: SmolLM2's is `<|im_start|>`, the
  chat-turn opener, which its tokenizer never adds to a plain encode.
  This is also how the engine encodes a prompt (`tokenizer(text)`), so the lens is fitted on
  text laid out as the prompts it is later read on.
- Sequences are consecutive and non-overlapping; the remainder (< seq_len tokens) is dropped.
  No BOS is inserted at a sequence start, so a sequence may begin mid-document. Every position
  of every sequence is a training token (no padding, no mask).
- The LAST `held_out` sequences are the held-out split; the training split is the sequences
  before them, cut to the first `max_train_sequences` when given. Capping the training split
  never changes the held-out split, and appending documents only adds sequences at the end.

A split is identified by `Corpus.split_hash`: SHA-256 of its shape and its token ids as int64
little endian, so the same ids always give the same hash whatever file or tokenizer call
produced them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from klstore.errors import KlstoreError, first_line

SPLITS = ("train", "held_out")
FILE_SUFFIXES = (".txt", ".jsonl")


class CorpusError(KlstoreError):
    """A corpus that cannot be read or packed; the message names the file, line or setting."""


@dataclass(frozen=True, eq=False)
class Corpus:
    """Packed token ids: train (n_train, seq_len) and held_out (n_held_out, seq_len), int64 on
    the CPU, and `source`, a description of what was read (provenance). Compare corpora by
    `split_hash`, not by `==` (identity)."""

    train: torch.Tensor  # (n_train, seq_len) int64
    held_out: torch.Tensor  # (n_held_out, seq_len) int64, n_held_out may be 0
    source: str = ""

    def __post_init__(self):
        for split in SPLITS:
            tensor = getattr(self, split)
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.dtype != torch.int64:
                raise CorpusError(f"corpus {split} must be a 2-D int64 tensor (n_sequences, seq_len)")
        if self.train.shape[1] != self.held_out.shape[1]:
            raise CorpusError(
                f"corpus splits differ in seq_len: train {self.train.shape[1]}, held_out {self.held_out.shape[1]}"
            )

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    @property
    def n_train_tokens(self) -> int:
        return self.train.numel()

    @property
    def n_held_out_tokens(self) -> int:
        return self.held_out.numel()

    def split_hash(self, split: str) -> str:
        """SHA-256 hex of b"int64 <rows>x<cols>\\n" + the split's ids as int64 little endian."""
        if split not in SPLITS:
            raise CorpusError(f"unknown corpus split {split!r}: choose {' or '.join(SPLITS)}")
        tensor = getattr(self, split)
        rows, cols = tensor.shape
        digest = hashlib.sha256(f"int64 {rows}x{cols}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().astype("<i8", copy=False).tobytes())
        return digest.hexdigest()


# ------------------------------------------------------------------------------------- reading
def read_texts(
    source: str, text_field: str = "text", dataset_split: str = "train", max_documents: int | None = None
) -> list[str]:
    """The documents of `source` (see the module docstring for the four kinds), in order, empty
    ones dropped, at most `max_documents` (the first ones). Raises CorpusError naming the file
    and line for a missing file, invalid JSON, a line without a string `text_field`, and an
    empty corpus."""
    if max_documents is not None and max_documents < 1:
        raise CorpusError(f"max_documents must be at least 1, got {max_documents}")
    path = Path(source).expanduser()
    if path.is_dir():
        texts = _read_folder(path, source, max_documents)
    elif path.is_file():
        if path.suffix == ".jsonl":
            texts = _read_jsonl(path, source, text_field, max_documents)
        elif path.suffix == ".txt":
            text = _read_file(path, source)
            texts = [text] if text.strip() else []
        else:
            raise CorpusError(f"corpus file {source}: use a .txt or .jsonl file, or a folder of .txt files")
    elif source.endswith((*FILE_SUFFIXES, ".json")) or source.startswith((".", "/", "~")):
        raise CorpusError(f"corpus file not found: {source}")
    else:
        texts = _read_dataset(source, text_field, dataset_split, max_documents)
    if not texts:
        raise CorpusError(f"corpus {source} is empty: no non-blank documents")
    return texts


def _read_file(path: Path, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"cannot read corpus file {label}: {first_line(exc)}") from None


def _read_folder(folder: Path, label: str, max_documents: int | None) -> list[str]:
    files = sorted(p for p in folder.iterdir() if p.suffix == ".txt" and p.is_file())
    if not files:
        raise CorpusError(f"corpus folder {label} has no .txt files")
    texts: list[str] = []
    for file in files:
        text = _read_file(file, str(Path(label) / file.name))
        if text.strip():
            texts.append(text)
            if max_documents is not None and len(texts) >= max_documents:
                break
    return texts


def _read_jsonl(path: Path, label: str, field: str, max_documents: int | None) -> list[str]:
    texts: list[str] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{label} line {number}: invalid JSON ({exc.msg})") from None
                text = _text_of(row, field, f"{label} line {number}")
                if text.strip():
                    texts.append(text)
                    if max_documents is not None and len(texts) >= max_documents:
                        break
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"cannot read corpus file {label}: {first_line(exc)}") from None
    return texts


def _text_of(row, field: str, where: str) -> str:
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: expected a JSON object with a string {field!r} field, got {type(row).__name__}")
    if field not in row:
        raise CorpusError(f"{where}: no {field!r} field")
    if not isinstance(row[field], str):
        raise CorpusError(f"{where}: field {field!r} is {type(row[field]).__name__}, not a string")
    return row[field]


def _read_dataset(name: str, field: str, split: str, max_documents: int | None) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            f"corpus {name!r} is neither a file nor a folder; reading it as a Hugging Face dataset "
            "needs the datasets package: pip install datasets"
        ) from None
    path, _, config = name.partition(":")
    try:
        rows = datasets.load_dataset(path, config or None, split=split)
    except Exception as exc:  # noqa: BLE001 - the loader's many errors are one user-facing line
        raise CorpusError(f"cannot load Hugging Face dataset {name!r} (split {split!r}): {first_line(exc)}") from None
    texts: list[str] = []
    for number, row in enumerate(rows):
        text = _text_of(row, field, f"dataset {name} row {number}")
        if text.strip():
            texts.append(text)
            if max_documents is not None and len(texts) >= max_documents:
                break
    return texts


# ------------------------------------------------------------------------------------- packing
def prepends_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS before a plain encode (`tokenizer(text)`)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    return list(tokenizer(["a"], add_special_tokens=True)["input_ids"][0][:1]) == [bos]


def pack(
    texts: list[str],
    tokenizer,
    seq_len: int,
    held_out: int,
    max_train_sequences: int | None = None,
    source: str = "",
) -> Corpus:
    """Tokenize, join and cut `texts` into a Corpus (the layout is in the module docstring).

    `tokenizer` is a Hugging Face tokenizer, or any object with `eos_token_id`, `bos_token_id`
    and `__call__(list_of_texts, add_special_tokens=bool) -> {"input_ids": [[int, ...], ...]}`."""
    if seq_len < 2:
        raise CorpusError(f"seq_len must be at least 2, got {seq_len}")
    if held_out < 0:
        raise CorpusError(f"held_out must be 0 or more sequences, got {held_out}")
    if max_train_sequences is not None and max_train_sequences < 1:
        raise CorpusError(f"max_train_sequences must be at least 1, got {max_train_sequences}")
    label = f"corpus {source}" if source else "corpus"
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise CorpusError(f"{label} is empty: no non-blank documents")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise CorpusError("the tokenizer has no EOS token to put between documents")
    head = [tokenizer.bos_token_id] if prepends_bos(tokenizer) else []
    pieces: list[torch.Tensor] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        if len(ids):
            pieces.append(torch.tensor(([eos] if pieces else []) + head + list(ids), dtype=torch.int64))
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)  # (n_tokens,)
    n_sequences = len(stream) // seq_len
    if n_sequences == 0:
        raise CorpusError(f"{label} has {len(stream)} tokens, fewer than one sequence of {seq_len}")
    if n_sequences < held_out + 1:
        raise CorpusError(
            f"{label} packs into {n_sequences} sequence(s) of {seq_len} tokens; "
            f"held_out={held_out} needs at least {held_out + 1} (one left for training)"
        )
    sequences = stream[: n_sequences * seq_len].view(n_sequences, seq_len)  # (n_sequences, seq_len)
    n_train = n_sequences - held_out
    if max_train_sequences is not None:
        n_train = min(n_train, max_train_sequences)
    return Corpus(
        train=sequences[:n_train].clone(),
        held_out=sequences[n_sequences - held_out :].clone(),
        source=source,
    )


def load_corpus(
    source: str,
    tokenizer,
    seq_len: int,
    held_out: int,
    max_train_sequences: int | None = None,
    text_field: str = "text",
    dataset_split: str = "train",
    max_documents: int | None = None,
) -> Corpus:
    """`read_texts` then `pack`. The Corpus's `source` is `source` as written (the home folder
    as `~`), with the text field, the dataset split and max_documents where not the defaults."""
    texts = read_texts(source, text_field, dataset_split, max_documents)
    home = str(Path.home())
    label = "~" + source[len(home) :] if home not in ("", "/") and source.startswith(home + os.sep) else source
    if text_field != "text":
        label += f" text_field={text_field}"
    if dataset_split != "train" and not Path(source).expanduser().exists():
        label += f" split={dataset_split}"
    if max_documents is not None:
        label += f" max_documents={max_documents}"
    return pack(texts, tokenizer, seq_len, held_out, max_train_sequences, label)
