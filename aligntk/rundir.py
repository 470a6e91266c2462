"""The run folder: refuse to overwrite a run by accident, start it, resume it faithfully."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint as ckpt
from .errors import AligntkError
from .plugins import Plugins
from .recipe import ResolvedRecipe
from .types import DataSplits

log = logging.getLogger("aligntk")

#: The run manifest: what this run wrote at the top of its folder, and what was there before it.
MANIFEST = "aligntk-run.json"
#: Entries in a run folder that mean "a run already wrote here" (the manifest, or runs from before it).
RUN_MARKERS = (MANIFEST, "metrics.jsonl", "recipe.yaml", "checkpoints", "model", "cache")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> list[Path]:
    """Refuse to write over an earlier run by accident; return the checkpoints to resume from, newest first.

    ``--overwrite`` replaces only a folder that an aligntk run wrote, and only when every
    entry in it is one that run's manifest lists: the user's own files are never deleted.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise AligntkError(f"output_dir: {run_dir} is a file, not a folder; set output_dir to a folder")
    if resume:
        found = ckpt.list_checkpoints(run_dir)[::-1]
        if not found:
            raise AligntkError(f"{run_dir}: --resume was given but there is no complete checkpoint to resume from")
        return found
    used = [m for m in RUN_MARKERS if (run_dir / m).exists() or (run_dir / m).is_symlink()]
    if used and not overwrite:
        raise AligntkError(
            f"{run_dir} already holds a run ({', '.join(used)}); pass --resume to continue it, "
            "--overwrite to replace it, or set output_dir to a new folder"
        )
    if overwrite and run_dir.is_dir() and any(run_dir.iterdir()):
        _removable(run_dir)  # refuse now, before any model loads
    return []


def _read_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / MANIFEST
    if not path.is_file() or path.is_symlink():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
        written, kept = found["written"], found["kept"]
    except (OSError, ValueError, KeyError, TypeError):
        raise AligntkError(f"{path}: not a readable run manifest; remove the folder's contents yourself") from None
    if not (isinstance(written, dict) and isinstance(kept, list)):
        raise AligntkError(f"{path}: not a readable run manifest; remove the folder's contents yourself")
    return found


def _kind(path: Path) -> str:
    return "link" if path.is_symlink() else "dir" if path.is_dir() else "file"


def _removable(run_dir: Path) -> list[Path]:
    """The entries ``--overwrite`` may delete; ``AligntkError`` when the folder holds anything else."""
    manifest = _read_manifest(run_dir)
    if manifest is None:
        entries = sorted(p.name for p in run_dir.iterdir())
        raise AligntkError(
            f"{run_dir}: --overwrite refused: the folder is not an aligntk run (no {MANIFEST}) and holds "
            f"{', '.join(entries[:5])}; move them or set output_dir to a new folder"
        )
    written, kept = manifest["written"], set(manifest["kept"])
    foreign = []
    for entry in sorted(run_dir.iterdir()):
        if entry.name == MANIFEST or entry.name in kept:
            continue
        if entry.name not in written:
            foreign.append(entry.name)
        elif _kind(entry) != written[entry.name]:
            foreign.append(f"{entry.name} (now a {_kind(entry)}, the run wrote a {written[entry.name]})")
    if foreign:
        raise AligntkError(
            f"{run_dir}: --overwrite refused: {', '.join(foreign[:5])} were not written by the run there; "
            "move them or set output_dir to a new folder"
        )
    return [run_dir / name for name in written if (run_dir / name).exists() or (run_dir / name).is_symlink()]


def _remove(path: Path) -> None:
    """Delete a file or a folder the run wrote, never following a symbolic link out of it."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)  # rmtree unlinks links inside rather than following them


def record_written(run_dir: Path, also: Sequence[str] = ()) -> None:
    """Add what is now at the top of the run folder to the manifest's ``written`` entries.

    Called at start, when a metrics record finds a new entry, and at the end, so files that
    lifecycle plugins write (diagnostics.jsonl ...) are the run's too. ``also``: folders
    about to be written (a temporary name), claimed before they exist.
    """
    manifest = _read_manifest(run_dir)
    if manifest is None:
        return
    kept = set(manifest["kept"])
    written = dict(manifest["written"])
    for name in also:
        written.setdefault(name, "dir")
    for entry in run_dir.iterdir():
        if entry.name != MANIFEST and entry.name not in kept and entry.name not in written:
            written[entry.name] = _kind(entry)
    if written != manifest["written"]:
        _write_manifest(run_dir, written, sorted(kept))


def _write_manifest(run_dir: Path, written: dict[str, str], kept: list[str]) -> None:
    tmp = run_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"written": dict(sorted(written.items())), "kept": kept}, indent=1), encoding="utf-8")
    os.replace(tmp, run_dir / MANIFEST)


def start_run_dir(run_dir: Path, resolved: ResolvedRecipe, plugins: Plugins, splits: DataSplits, fresh: bool) -> None:
    """Called once set-up has succeeded, so a recipe or data mistake never touches an earlier run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        if _read_manifest(run_dir) is not None:  # --overwrite of an earlier run, checked at start
            for path in _removable(run_dir):
                _remove(path)
            kept = _read_manifest(run_dir)["kept"]  # type: ignore[index]
        else:  # a new folder, or one holding the user's own files, which stay
            kept = sorted(p.name for p in run_dir.iterdir())
        _write_manifest(run_dir, {}, kept)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(resolved.dump(), sort_keys=False))
        (run_dir / "plugins.json").write_text(json.dumps(plugins.versions(), indent=2))
    elif _read_manifest(run_dir) is None:  # resuming a run from before manifests: adopt it
        _write_manifest(run_dir, {e.name: _kind(e) for e in run_dir.iterdir()}, [])
    report = splits.report
    fields = {"rows": report.rows, "skipped": report.skipped, "unknown_tokens": report.unknown_tokens}
    (run_dir / "data_report.json").write_text(json.dumps(fields, indent=2))
    for reason, n in report.skipped.items():
        log.warning("data: skipped %d row(s): %s (see %s)", n, reason, run_dir / "data_report.json")
    record_written(run_dir)


def check_same_recipe(run_dir: Path, resolved: ResolvedRecipe) -> None:
    """A resumed run must use the recipe it started with, or it would not end where that run would."""
    saved_file = run_dir / "recipe.yaml"
    if not saved_file.exists():
        return
    saved = yaml.safe_load(saved_file.read_text())
    now = resolved.dump()
    changed = _diff_keys(saved, now)
    if changed:
        raise AligntkError(
            f"{run_dir}: --resume with a recipe that differs from the run's ({', '.join(changed[:5])}); "
            "resume with the same recipe, or start a new run in another output_dir"
        )


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [k for i, (x, y) in enumerate(zip(a, b)) for k in _diff_keys(x, y, f"{prefix}{i}.")]
    return [] if a == b else [prefix.rstrip(".")]


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget records past the checkpoint being resumed: those steps run again.

    A line that is not JSON (the torn last line of a run killed mid-write) is dropped with a warning.
    """
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: dropped a line that is not a whole JSON record (a write cut short)", path, number)
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
