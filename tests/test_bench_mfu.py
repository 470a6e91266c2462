"""The MFU benchmark runs at a tiny size on the CPU (--smoke) and writes its results."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mfu" / "run.py"


def test_mfu_smoke(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").stat().st_size > 0
    for who in ("aligntk", "bare"):
        assert summary["median"][who]["tokens_per_s"] > 0
    # Same weights, batches, loss and update: the engine and the bare loop follow one curve at fp32.
    assert summary["max_abs_loss_gap"] < 1e-4
    assert summary["flops_per_token"]["palm"] > 0


def test_mfu_peak_table() -> None:
    spec = importlib.util.spec_from_file_location("mfu_run", SCRIPT)
    mfu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mfu)
    peak_tflops, flops_per_token = mfu.peak_tflops, mfu.flops_per_token

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("some other device") is None
    config = {"vocab_size": 10, "hidden_size": 4, "num_hidden_layers": 2}
    # N without the input embedding = 100 - 40 = 60; attention 12 * 2 * 4 * 8 = 768
    assert flops_per_token(config, 100, 8)["palm"] == 6 * 60 + 768
