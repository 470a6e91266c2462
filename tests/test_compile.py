"""train.compile: the compiled training forward gives the plain run's losses (slow: it compiles)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "compile" / "run.py"


@pytest.mark.slow
def test_compiled_run_matches_the_plain_run_and_the_benchmark_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    argv = ["run.py", "--steps", "3", "--warmup", "1", "--repeats", "1", "--hidden", "32", "--layers", "1",
            "--width", "12", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(BENCHMARK), run_name="__main__")
    summary = json.loads((out / "results.json").read_text())
    assert summary["max_loss_difference"] < 1e-4
    assert summary["ratio_compiled_over_plain"]["median"] > 0
