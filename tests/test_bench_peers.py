"""The peers benchmark (aligntk vs TRL SFTTrainer) runs end to end at a tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "run.py"


def test_peers_benchmark_tiny(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--steps", "4", "--warmup", "1", "--repeats", "1", "--hidden", "64",
           "--layers", "2", "--rows", "32", "--batch-size", "2", "--min-len", "40", "--max-len", "60",
           "--max-length", "64", "--threads", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    for name in ("results.md", "results.json", "loss_curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "results.json").read_text())
    for key in ("ratio_tokens_per_s", "ratio_peak_rss"):
        assert all(v > 0 for v in summary[key].values()), (key, summary[key])
    # Same initial weights, data, order and update: the two trainers start from the same loss.
    first = summary["first_loss"]
    assert first["aligntk"][0] == pytest.approx(first["trl"][0], abs=1e-3)
    assert len(summary["losses"]["aligntk"][0]) == len(summary["losses"]["trl"][0]) == 4
