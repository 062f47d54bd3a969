"""What the lens-fit tests share: a small JSON Lines corpus of common English words."""

from __future__ import annotations

import json
import random

WORDS = (
    "the of and a to in is was he for it with as his on be at by this had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said"
).split()


def word_corpus(path, documents: int, words: int, seed: int):
    """Write `documents` lines {"text": <`words` seeded random words>} to `path`; returns it."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(documents):
            handle.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return path
