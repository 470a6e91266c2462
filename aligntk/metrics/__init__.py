"""Metrics shipped with aligntk as local ``evaluate`` modules, loadable without network.

Each metric lives in ``aligntk/metrics/<name>/<name>.py`` (the layout ``evaluate.load``
expects for a local directory) and is loaded by path, so nothing is fetched from the
Hugging Face Hub.
"""

from __future__ import annotations

import functools
from pathlib import Path

import evaluate

from ..errors import AligntkError

_HERE = Path(__file__).parent


def available_metrics() -> list[str]:
    """The names of the metric modules shipped in this package, sorted."""
    return sorted(p.name for p in _HERE.iterdir() if p.is_dir() and (p / f"{p.name}.py").is_file())


@functools.cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load a shipped metric by name, once per process.

    ``evaluate.load`` copies the script into its modules cache
    (``$HF_MODULES_CACHE``, by default ``~/.cache/huggingface/modules``) and imports it;
    caching the instance keeps repeated evaluations from paying that again.

    Args:
        name: a shipped metric, such as ``"exact_match"``.

    Returns:
        The metric; call ``.compute(predictions=..., references=...)``.

    Raises:
        AligntkError: ``name`` is not a shipped metric (the message lists those that are).
    """
    if name not in available_metrics():
        shipped = ", ".join(available_metrics()) or "none"
        raise AligntkError(f"unknown metric {name!r}; aligntk ships: {shipped}")
    # keep_in_memory: evaluate otherwise writes every prediction batch to an Arrow file
    # under ~/.cache/huggingface/evaluate before computing; metrics here are small.
    return evaluate.load(str(_HERE / name), keep_in_memory=True)
