"""Write preference pairs for the quickstart's addition task: ``train.jsonl``, ``test.jsonl``.

Run from anywhere: ``python recipes/assets/prefs/make_prefs.py``. The output is
deterministic (seeded), so running it again reproduces the committed files byte for byte.

Each row of ``../arith/train.jsonl`` (the first ``TRAIN_SIZE``) and ``../arith/test.jsonl``
becomes ``{"prompt": "23+45=", "chosen": "68", "rejected": "69"}``: the right sum chosen and
a near miss rejected, off by a small amount or by ten (a dropped or extra carry), the kinds
of mistake a half-trained model makes. A rejected answer is never negative.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 4321
TRAIN_SIZE = 2000
#: How far the rejected answer is from the right one.
OFFSETS = (-10, -2, -1, 1, 2, 10)

HERE = Path(__file__).resolve().parent
ARITH = HERE.parent / "arith"


def pairs(source: Path, limit: int | None, rng: random.Random) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()][:limit]
    out = []
    for row in rows:
        answer = int(row["completion"])
        wrong = answer + rng.choice([o for o in OFFSETS if answer + o >= 0])
        out.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": str(wrong)})
    return out


def main() -> None:
    rng = random.Random(SEED)
    for name, limit in (("train.jsonl", TRAIN_SIZE), ("test.jsonl", None)):
        rows = pairs(ARITH / name, limit, rng)
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {HERE / name}")


if __name__ == "__main__":
    main()
