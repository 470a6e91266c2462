"""Write the quickstart's two-digit addition task: ``train.jsonl``, ``test.jsonl``, ``tokenizer/``.

Run from anywhere: ``python recipes/assets/arith/make_assets.py``. The output is
deterministic (seeded), so running it again reproduces the committed files byte for byte.

Every pair ``a + b`` with ``a, b`` in 0..99 is shuffled once; the first ``TEST_SIZE``
pairs are the test split and the next ``TRAIN_SIZE`` the training split, so no test pair
(in the same order) is ever seen in training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from aligntk.testing import char_tokenizer

SEED = 1234
TEST_SIZE = 500
#: Half the addition table: enough for a ~1M-parameter model to generalize, small enough
#: to keep the committed files under a few hundred kilobytes.
TRAIN_SIZE = 5000
#: The only characters the task uses; ``char_tokenizer`` adds its special tokens.
CHARS = "0123456789+="

HERE = Path(__file__).resolve().parent


def rows(pairs: list[tuple[int, int]]) -> list[dict[str, str]]:
    """``{"prompt": "23+45=", "completion": "68"}`` for each pair."""
    return [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in pairs]


def write_jsonl(path: Path, items: list[dict[str, str]]) -> None:
    """Write one JSON object a line, with ``\\n`` line ends on every platform."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")


def main(out: Path = HERE) -> None:
    """Write the splits and the tokenizer into ``out``."""
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(SEED).shuffle(pairs)
    test, train = pairs[:TEST_SIZE], pairs[TEST_SIZE : TEST_SIZE + TRAIN_SIZE]
    assert not set(test) & set(train)
    write_jsonl(out / "train.jsonl", rows(train))
    write_jsonl(out / "test.jsonl", rows(test))
    char_tokenizer(CHARS).save_pretrained(out / "tokenizer")
    print(f"wrote {len(train)} train and {len(test)} test rows and tokenizer/ to {out}")


if __name__ == "__main__":
    main()
