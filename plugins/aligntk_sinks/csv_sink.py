"""CSV: every logged record as one row of ``metrics.csv``: ``split``, ``step``, then one column per metric.

Train and evaluation rows share the file; a metric a row does not have is an empty cell.
When a record brings a metric the header lacks (the first evaluation, say), the file is
written again with the wider header. A resumed run first drops the rows past the
checkpoint it resumes from, as the engine does with ``metrics.jsonl``. Samples are not
written here (they are in ``samples.jsonl``).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from aligntk import RunInfo

from .options import CsvOptions

#: The default file, inside the run folder.
FILE = "metrics.csv"
FIXED = ["split", "step"]


class CsvSink:
    append_only = False

    def __init__(self, options: CsvOptions, run: RunInfo):
        self.path = Path(options.path or Path(run.run_dir) / FILE)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = []
        self.columns = list(FIXED)
        if run.start_step and self.path.exists():
            with self.path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or FIXED)
                rows = [r for r in reader if r.get("step", "").isdigit() and int(r["step"]) <= run.start_step]
        self._rewrite(rows)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def metrics(self, split: str, step: int, values: dict[str, float]) -> None:
        row = {"split": split, "step": step, **{k: repr(v) for k, v in values.items()}}
        new = [k for k in values if k not in self.columns]
        if new:
            with self.path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            self.columns += new
            self._rewrite([*rows, row])
            return
        with self.path.open("a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def samples(self, step: int, evaluator: str, rows: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
        pass  # samples.jsonl holds them; a CSV of metrics has no place for text

    def close(self, error: BaseException | None) -> None:
        pass  # every row is written as it comes
