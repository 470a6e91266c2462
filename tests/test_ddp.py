"""DDP: two processes (gloo on CPU) end with the weights of one process on the same global batch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import free_port


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
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), "-m", "aligntk", "run", str(recipe), f"output_dir={two}",
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


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker processes through /proc")
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tiny: dict[str, Any], tmp_path: Path) -> None:
    import signal
    import time

    recipe = tmp_path / "r.json"
    out = tmp_path / "run"
    tiny.update(output_dir=str(out))
    tiny["train"].update(max_steps=40, batch_size=2, save_every=100)
    recipe.write_text(json.dumps(tiny))
    driver = Path(__file__).parent / "crash_driver.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), str(driver), str(recipe), "slow", "0"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and '"step": 3,' in metrics.read_text():
            break
        time.sleep(0.1)
    workers = [c for c in _children(proc.pid) if _rank_of(c) is not None]
    rank1 = [c for c in workers if _rank_of(c) == 1]
    assert rank1, "no rank-1 worker found"
    os.kill(rank1[0], signal.SIGTERM)  # only rank 1 is told
    _, err = proc.communicate(timeout=240)
    steps = {int(s) for s in re.findall(r"stopped by SIGTERM after step (\d+) of 40", err)}
    assert len(steps) == 1, err[-3000:]  # both ranks, the same step
    assert len(re.findall(r"stopped by SIGTERM after step", err)) == 2, err[-3000:]
    (step,) = steps
    assert 3 <= step < 40
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step:08d}"]
    assert json.loads((metrics.read_text().splitlines())[-1])["step"] == step
