"""What every sink shares: the interface the plugin calls, the recipe as flat hyperparameters, samples.

A sink receives each logged record once, as ``(split, step, values)``: ``split`` is ``train``
(each logged step) or ``eval`` (each evaluation, step 0 before training), ``values`` the
record's numbers. Names are ``<split>/<key>`` (``train/loss``, ``eval/exact_match``) in
every sink but CSV, which has a ``split`` column.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Protocol

from aligntk import RecipeError

from .options import missing_library

#: The file the engine writes each evaluation's samples to (``EvaluatorCapabilities.samples``).
SAMPLES_FILE = "samples.jsonl"
#: The columns of a sample, as the engine writes them (besides ``step`` and ``evaluator``).
SAMPLE_COLUMNS = ("step", "index", "prompt", "completion", "reference", "score")


class Sink(Protocol):
    """One logging backend, for one run."""

    #: Whether what the sink wrote cannot be taken back (W&B, MLflow): on resume the plugin
    #: then leaves out the steps it already sent; the others rewrite their own files.
    append_only: bool

    def metrics(self, split: str, step: int, values: dict[str, float]) -> None: ...

    def samples(self, step: int, evaluator: str, rows: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
        """``rows``: this evaluation's samples of ``evaluator``; ``history``: all of its samples so far."""

    def close(self, error: BaseException | None) -> None: ...


def require(sink: str, module: str) -> Any:
    """Import a sink's library, or stop with the line naming the recipe key and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RecipeError(missing_library(sink, module)) from None


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a record (bools, strings, ``step`` and ``split`` left out)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "split")
    }


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested recipe as ``{"train.max_steps": 4, "loss.0.name": "sft", ...}`` of scalars."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}{key}."))
        return out
    if isinstance(value, (list, tuple)) and value and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, inner in enumerate(value):
            out.update(flatten(inner, f"{prefix}{i}."))
        return out
    key = prefix.rstrip(".")
    if value is None or isinstance(value, (bool, int, float, str)):
        return {key: value}
    return {key: json.dumps(value, default=str)}


def read_samples(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of the run's ``samples.jsonl`` (none when no evaluator shows samples)."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a write cut short; the engine drops it when it next writes
    return out
