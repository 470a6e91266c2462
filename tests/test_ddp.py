"""DDP: two processes (gloo on CPU) end with the weights of one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_match_one_process(tiny: dict[str, Any], tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny))
    one, two = tmp_path / "one", tmp_path / "two"
    # One process: 2 micro-batches of 2. Two processes: 1 micro-batch of 2 each.
    _run(
        [sys.executable, "-m", "aligntk", "run", str(recipe), f"output_dir={one}",
         "train.max_steps=3", "train.batch_size=2", "train.grad_accum=2"],
        tmp_path,
    )
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "aligntk", "run", str(recipe), f"output_dir={two}",
         "train.max_steps=3", "train.batch_size=2", "train.grad_accum=1"],
        tmp_path,
    )
    a = load_file(str(one / "model" / "model.safetensors"))
    b = load_file(str(two / "model" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-5, msg=name)
    lines_one = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    lines_two = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    # Only rank 0 writes: one record per step and evaluation, not two.
    assert [r["step"] for r in lines_two] == [r["step"] for r in lines_one] == [0, 1, 2, 3, 3]
    for r1, r2 in zip(lines_one, lines_two):
        key = "loss" if r1["split"] == "train" else "eval_loss"
        assert abs(r1[key] - r2[key]) < 1e-5 * max(1.0, abs(r1[key]))
        if r1["split"] == "train":
            assert r1["tokens"] == r2["tokens"]
