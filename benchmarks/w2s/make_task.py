"""Build the benchmark's sentiment task from the VADER lexicon (human-rated word valence).

Each text is three lexicon words; the label is 1 when their summed valence is positive.
A model that already knows what words mean (a pre-trained encoder) can label texts made
of words it never saw in training; a model trained from scratch on a few thousand texts
cannot. That knowledge gap is what weak-to-strong generalization needs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS_PER_TEXT = 3
MIN_VALENCE = 1.0  # only clearly positive or negative words
MIN_MARGIN = 0.5  # skip texts whose summed valence is nearly zero


def lexicon() -> dict[str, float]:
    """Alphabetic VADER words with ``|valence| >= MIN_VALENCE``."""
    import vaderSentiment

    path = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    words = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        word, valence = line.split("\t")[:2]
        if word.isalpha() and abs(float(valence)) >= MIN_VALENCE:
            words[word] = float(valence)
    return words


def make_rows(words: dict[str, float], n: int, rng: random.Random) -> list[dict[str, object]]:
    vocab = sorted(words)
    rows: list[dict[str, object]] = []
    while len(rows) < n:
        chosen = rng.sample(vocab, WORDS_PER_TEXT)
        total = sum(words[w] for w in chosen)
        if abs(total) >= MIN_MARGIN:
            rows.append({"text": " ".join(chosen), "label": int(total > 0)})
    return rows


def write_task(folder: Path, n_train: int = 4000, n_test: int = 2000, seed: int = 0) -> None:
    """``train.jsonl`` (split in two by the protocol) and ``test.jsonl`` in ``folder``."""
    rng = random.Random(seed)
    words = lexicon()
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", n_train), ("test.jsonl", n_test)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in make_rows(words, n, rng)))


if __name__ == "__main__":
    write_task(Path(__file__).parent / "data")
