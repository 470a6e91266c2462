"""Write unpaired preference rows for KTO and BCO from the pairs: ``unpaired_train.jsonl``, ``unpaired_test.jsonl``.

Run from anywhere: ``python recipes/assets/prefs/make_unpaired.py`` (after ``make_prefs.py``). No
randomness: running it again reproduces the committed files byte for byte.

Each pair ``{"prompt": "23+45=", "chosen": "68", "rejected": "69"}`` of ``train.jsonl`` and
``test.jsonl`` becomes two rows, the desirable one first, as TRL's
``unpair_preference_dataset`` splits a pair:
``{"prompt": "23+45=", "completion": "68", "label": true}`` and
``{"prompt": "23+45=", "completion": "69", "label": false}``.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def unpair(source: Path) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    out: list[dict[str, object]] = []
    for row in rows:
        out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    return out


def main() -> None:
    for source, target in (("train.jsonl", "unpaired_train.jsonl"), ("test.jsonl", "unpaired_test.jsonl")):
        rows = unpair(HERE / source)
        (HERE / target).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {HERE / target}")


if __name__ == "__main__":
    main()
