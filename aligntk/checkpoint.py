"""Checkpoints that a crash never leaves half-written, and exact resume.

A checkpoint is a folder ``checkpoints/step-00000012`` holding the model weights
(safetensors), the optimizer, scheduler and scaler state, and the random-number
state. It is written under a temporary name and renamed into place, so any folder
with a final name is complete. The data order is a function of the step (see
``engine.global_batch_indices``), so no data-loader state is needed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from .errors import AligntkError

_PREFIX = "step-"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    keep: int,
    trainer_state: dict[str, Any],
) -> Path:
    """Write the checkpoint for ``step`` atomically; keep the newest ``keep`` checkpoints."""
    root = checkpoint_dir(run_dir)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{_PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))  # de-duplicates tied weights
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(state, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}))
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same step after a resume: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are not complete)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; return its trainer state (``step`` ...)."""
    try:
        load_model(model, str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        int(trainer_state["step"])
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise AligntkError(f"{path}: cannot resume from this checkpoint: {exc}".splitlines()[0]) from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return trainer_state


def _fsync_dir(path: Path) -> None:
    """Make the folder's entries durable before the rename is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
