"""The benchmark scripts run (tiny sizes, one repeat); their timings are not checked here."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_overhead_benchmark_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["run.py", "--steps", "12", "--repeats", "1", "--out", str(out)])
    runpy.run_path(str(BENCHMARKS / "overhead" / "run.py"), run_name="__main__")
    summary = json.loads((out / "results.json").read_text())
    assert summary["ratio"]["median"] > 0
    assert "ratio" in (out / "results.md").read_text()
