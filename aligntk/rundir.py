"""The run folder: refuse to overwrite a run by accident, start it, resume it faithfully."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint as ckpt
from .errors import AligntkError
from .plugins import Plugins
from .recipe import ResolvedRecipe
from .types import DataSplits

log = logging.getLogger("aligntk")

#: Files in a run folder that mean "a run already wrote here".
RUN_MARKERS = ("metrics.jsonl", "recipe.yaml", "checkpoints", "model", "cache")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to write over an earlier run by accident; return the checkpoint to resume from."""
    if resume:
        found = ckpt.latest_checkpoint(run_dir)
        if found is None:
            raise AligntkError(f"{run_dir}: --resume was given but there is no complete checkpoint to resume from")
        return found
    used = [m for m in RUN_MARKERS if (run_dir / m).exists()]
    if used and not overwrite:
        raise AligntkError(
            f"{run_dir} already holds a run ({', '.join(used)}); pass --resume to continue it, "
            "--overwrite to replace it, or set output_dir to a new folder"
        )
    return None


def start_run_dir(run_dir: Path, resolved: ResolvedRecipe, plugins: Plugins, splits: DataSplits, fresh: bool) -> None:
    """Called once set-up has succeeded, so a recipe or data mistake never touches an earlier run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        for m in RUN_MARKERS:  # only reached with --overwrite when a run is there
            target = run_dir / m
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(resolved.dump(), sort_keys=False))
        (run_dir / "plugins.json").write_text(json.dumps(plugins.versions(), indent=2))
    report = splits.report
    (run_dir / "data_report.json").write_text(json.dumps({"rows": report.rows, "skipped": report.skipped}, indent=2))
    for reason, n in report.skipped.items():
        log.warning("data: skipped %d row(s): %s (see %s)", n, reason, run_dir / "data_report.json")


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
    """Forget records past the checkpoint being resumed: those steps run again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))
