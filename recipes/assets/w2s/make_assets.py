"""Write the tiny weak-to-strong demo task: a character tokenizer, train.jsonl and test.jsonl.

Texts are six random digits; the label is 1 when the digits sum to more than 27 (their
mean). Regenerate with ``python recipes/assets/w2s/make_assets.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from aligntk.testing import char_tokenizer


def main(folder: Path = Path(__file__).parent, seed: int = 0) -> None:
    char_tokenizer("0123456789").save_pretrained(folder / "tokenizer")
    rng = random.Random(seed)
    for name, n in (("train.jsonl", 2000), ("test.jsonl", 1000)):
        with (folder / name).open("w") as f:
            for _ in range(n):
                digits = [rng.randrange(10) for _ in range(6)]
                f.write(json.dumps({"text": "".join(map(str, digits)), "label": int(sum(digits) > 27)}) + "\n")


if __name__ == "__main__":
    main()
