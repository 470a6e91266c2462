"""Checkpoints that a crash never leaves half-written, and exact resume.

A checkpoint is a folder ``checkpoints/step-00000012`` holding the model weights
(safetensors), the optimizer, scheduler and scaler state, the random-number state, and
``manifest.json`` (each file's size and sha256). It is written under a temporary name,
every file is fsynced, and the folder is renamed into place, so a folder with a final
name was complete when it was written. Its manifest tells, on resume, whether it is
still the same: a checkpoint damaged later (a truncated file, a flipped byte, a file
deleted) is passed over with a warning for the newest one that verifies and loads.

Under ``train.distributed: fsdp`` the weights and optimizer state are instead a
``torch.distributed.checkpoint`` folder ``sharded/`` (one file per process, written by
every process at once), with each process's random-number state beside it; the main
process writes the rest, the manifest and the rename after a barrier
(``save_sharded_checkpoint``). A run on another number of processes resumes from it:
DCP reshards.

Weights are checked finite before anything is written, so every checkpoint is a good
one to go back to. The data order is a function of the step (see
``engine.global_batch_indices``), so no data-loader state is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model

from .errors import AligntkError, TrainingError

log = logging.getLogger("aligntk")

_PREFIX = "step-"
MANIFEST = "manifest.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers holding a NaN or an infinity (empty when all are finite)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    floating = [(n, t) for n, t in tensors if t.is_floating_point()]
    if not floating:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in floating]).tolist()  # one host sync
    return [n for (n, _), ok in zip(floating, finite) if not ok]


def require_finite(model: torch.nn.Module, what: str) -> None:
    """Refuse to write ``what`` when any weight is not finite: a NaN model is never saved."""
    bad = nonfinite_parameters(model)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise TrainingError(f"not writing {what}: {len(bad)} weight tensor(s) are not finite ({shown})")


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    keep: int,
    trainer_state: dict[str, Any],
    data_state: dict[str, Any] | None = None,
    only_trainable: bool = False,
) -> Path:
    """Write the checkpoint for ``step`` atomically; keep the newest ``keep`` checkpoints.

    ``only_trainable`` writes only the parameters that train (an adapter, unfrozen layers,
    trainable heads): the frozen rest is rebuilt the same on resume (``trains_a_part``).

    ``data_state`` is what the batch source needs to go on exactly (online data's rollout
    block in use); it comes back as the trainer state's ``data`` on load.

    Raises:
        TrainingError: a weight is not finite; nothing is written and older checkpoints stay.
    """
    require_finite(model, f"the checkpoint for step {step}")
    root = checkpoint_dir(run_dir)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{_PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if only_trainable:
        from safetensors.torch import save_file

        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, str(tmp / "model.safetensors"))
    else:
        save_model(model, str(tmp / "model.safetensors"))  # de-duplicates tied weights
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "data": data_state or {},
    }
    torch.save(state, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}))
    write_manifest(tmp)
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same step after a resume: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
    trainer_state: dict[str, Any],
    data_state: dict[str, Any] | None = None,
    only_trainable: bool = False,
) -> Path:
    """``save_checkpoint`` for an FSDP2-sharded ``model``: every process calls it (a collective).

    Every process writes its shards and its random-number state into the temporary folder;
    after a barrier the main process writes the scheduler and trainer state and the
    manifest, and renames the folder into place; a last barrier, and every process returns.

    Raises:
        TrainingError: a weight is not finite (on every process); nothing is written.
    """
    import torch.distributed as dist

    from . import sharding

    bad = sharding.nonfinite_shards(model)  # agreed over processes: all raise or none
    if bad:
        raise TrainingError(f"not writing the checkpoint for step {step}: {len(bad)} weight tensor(s) are not finite ({bad[0]})")
    rank = dist.get_rank()
    root = checkpoint_dir(run_dir)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{_PREFIX}{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    sharding.save_shards(tmp / sharding.SHARDED, model, optimizer, only_trainable)
    torch.save(_rng_state(), tmp / f"rng-{rank}.pt")
    dist.barrier()  # every process's files are complete before the main one lists them
    if rank == 0:
        state = {"scheduler": scheduler.state_dict(), "data": data_state or {}}
        torch.save(state, tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(
            json.dumps({**trainer_state, "step": step, "world_size": dist.get_world_size()})
        )
        write_manifest(tmp)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _rng_state() -> dict[str, Any]:
    return {
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def _load_sharded(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, only_trainable: bool
) -> dict[str, Any]:
    """Restore a ``save_sharded_checkpoint`` folder into this run (every process calls it)."""
    import torch.distributed as dist

    from . import sharding

    problem = verify(path)
    if problem is not None:
        raise AligntkError(problem)
    try:
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        int(trainer_state["step"])
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, EOFError, pickle.UnpicklingError) as exc:
        raise AligntkError(f"{path}: cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    try:
        sharding.load_shards(path / sharding.SHARDED, model, optimizer, only_trainable)
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise AligntkError(f"{path}: does not fit this run's model or optimizer: {exc}".splitlines()[0]) from None
    rank = dist.get_rank()
    own = path / f"rng-{rank}.pt"  # another process count: every process takes the main one's
    rng = own if own.is_file() and trainer_state.get("world_size") == dist.get_world_size() else path / "rng-0.pt"
    _set_rng_state(torch.load(rng, weights_only=True, map_location="cpu"))
    return {**trainer_state, "data": state.get("data") or {}}


def write_manifest(folder: Path) -> None:
    """fsync every file in ``folder`` and record its size and sha256 in ``manifest.json``."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        _fsync_file(path)
    manifest = folder / MANIFEST
    manifest.write_text(json.dumps({"files": files}, indent=1))
    _fsync_file(manifest)


def verify(folder: Path) -> str | None:
    """Why ``folder`` is not the checkpoint its manifest describes (None when it is).

    A checkpoint from before manifests were written has none and is taken as it is;
    loading it still has to succeed.
    """
    manifest = folder / MANIFEST
    if not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{manifest} is not a readable manifest"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path} has {size} bytes, the manifest says {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its sha256 in the manifest"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints with a final name, oldest first (temporary folders are not complete)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies against its manifest, or None."""
    return next((p for p in reversed(list_checkpoints(run_dir)) if verify(p) is None), None)


def load_latest(
    candidates: Iterable[Path],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    only_trainable: bool = False,
    sharded: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Restore the newest of ``candidates`` (newest first) that verifies and loads.

    ``sharded``: the model is FSDP2-sharded and the checkpoints are ``save_sharded_checkpoint``'s;
    every process calls this. A checkpoint of the other kind is an error naming the setting.

    With ``only_trainable`` a checkpoint must hold every trainable parameter (and nothing
    the model lacks); frozen weights stay as built.

    A damaged one is passed over with a one-line warning naming the file. Everything is
    read and checked before the model and optimizer are touched, so a checkpoint that
    fails to load leaves them as they were for the next one.

    Raises:
        AligntkError: no candidate loads; the message says why the newest did not.
    """
    from .sharding import SHARDED

    reasons: list[str] = []
    for path in candidates:
        if (path / SHARDED).is_dir() != sharded:
            written, here = ("fsdp", "ddp") if not sharded else ("ddp", "fsdp")
            raise AligntkError(
                f"{path}: written by a train.distributed: {written} run; this run is {here}: "
                f"resume it with train.distributed={written}"
            )
        if sharded:
            try:
                return path, _load_sharded(path, model, optimizer, scheduler, only_trainable)
            except AligntkError as exc:
                if "does not fit" in str(exc):
                    raise
                log.warning("skipping damaged checkpoint: %s", exc)
                reasons.append(str(exc))
                continue
        try:
            loaded = _read(path)
        except AligntkError as exc:
            log.warning("skipping damaged checkpoint: %s", exc)
            reasons.append(str(exc))
            continue
        weights, state, trainer_state = loaded
        _check_keys(model, weights, path, only_trainable)
        try:
            model.load_state_dict(weights, strict=False)  # tied names were saved once: _check_keys
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:  # a checkpoint of another model or optimizer
            raise AligntkError(f"{path}: does not fit this run's model or optimizer: {exc}".splitlines()[0]) from None
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        return path, {**trainer_state, "data": state.get("data") or {}}
    detail = f": newest: {reasons[0]}" if reasons else ""
    raise AligntkError(f"--resume: no checkpoint could be loaded ({len(reasons)} damaged){detail}")


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote into ``path``; return its trainer state (``step`` ...)."""
    return load_latest([path], model, optimizer, scheduler, scaler)[1]


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Weights, state and trainer state of one checkpoint, verified; ``AligntkError`` names the bad file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    problem = verify(path)
    if problem is not None:
        raise AligntkError(problem)
    current = path / "model.safetensors"
    try:
        weights = load_file(str(current))
        current = path / "state.pt"
        state = torch.load(current, weights_only=True, map_location="cpu")
        current = path / "trainer_state.json"
        trainer_state = json.loads(current.read_text())
        int(trainer_state["step"])
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, EOFError, SafetensorError, pickle.UnpicklingError) as exc:
        # torch.load's message suggests weights_only=False, which would run pickled code: never repeat it.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in reason or "pickle" in reason.lower():
            reason = "not a readable checkpoint state file"
        raise AligntkError(f"{current}: cannot be read ({reason})") from None
    bad = [n for n, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise AligntkError(f"{path / 'model.safetensors'}: {len(bad)} weight tensor(s) are not finite ({bad[0]})")
    return weights, state, trainer_state


def trains_a_part(model: torch.nn.Module) -> bool:
    """Whether some parameters are frozen: then checkpoints hold only the trainable ones."""
    flags = [p.requires_grad for p in model.parameters()]
    return any(flags) and not all(flags)


def _check_keys(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path, only_trainable: bool = False
) -> None:
    """Every saved tensor must be in the model, and every model tensor saved (tied weights aside);
    with ``only_trainable``, every trainable parameter."""
    own = model.state_dict()
    unexpected = sorted(set(weights) - set(own))
    # save_model drops the second name of a tied pair; those share storage with a saved one.
    saved_storage = {own[n].untyped_storage().data_ptr() for n in weights if n in own}
    required = {n for n, p in model.named_parameters() if p.requires_grad} if only_trainable else set(own)
    missing = sorted(n for n in required - set(weights) if own[n].untyped_storage().data_ptr() not in saved_storage)
    if unexpected or missing:
        raise AligntkError(
            f"{path / 'model.safetensors'}: does not fit this run's model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    """Make a file's contents durable before the folder holding it is renamed into place."""
    with path.open("rb") as f:
        os.fsync(f.fileno())


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
