"""Metrics shipped as local ``evaluate`` modules, loadable without network.

Each metric lives in ``<folder>/<name>/<name>.py`` (the layout ``evaluate.load`` expects
for a local directory) and is loaded by path, so nothing is fetched from the Hugging Face
Hub. aligntk ships its own in ``aligntk/metrics/`` (``exact_match``); a plugin ships its
own the same way in a folder of its package (listed as package data) and passes that
folder, as the weak-to-strong plugin does for ``pgr``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AligntkError

if TYPE_CHECKING:
    import evaluate

_HERE = Path(__file__).parent


def available_metrics(folder: Path | None = None) -> list[str]:
    """The names of the metric modules in ``folder`` (default: aligntk's own), sorted."""
    root = _HERE if folder is None else Path(folder)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / f"{p.name}.py").is_file())


@functools.cache
def load_metric(name: str, folder: Path | None = None) -> evaluate.EvaluationModule:
    """Load a shipped metric by name, once per process.

    ``evaluate.load`` copies the script into its modules cache
    (``$HF_MODULES_CACHE``, by default ``~/.cache/huggingface/modules``) and imports it;
    caching the instance keeps repeated evaluations from paying that again.

    Args:
        name: a shipped metric, such as ``"exact_match"``.
        folder: the folder holding ``<name>/<name>.py``; default: aligntk's own metrics.

    Returns:
        The metric; call ``.compute(predictions=..., references=...)``.

    Raises:
        AligntkError: ``name`` is not a metric in ``folder`` (the message lists those that are).
    """
    import evaluate  # slow to import: only when a metric is loaded

    root = _HERE if folder is None else Path(folder)
    shipped = available_metrics(root)
    if name not in shipped:
        owner = "aligntk ships" if folder is None else f"{root} holds"
        raise AligntkError(f"unknown metric {name!r}; {owner}: {', '.join(shipped) or 'none'}")
    # keep_in_memory: evaluate otherwise writes every prediction batch to an Arrow file
    # under ~/.cache/huggingface/evaluate before computing; metrics here are small.
    return evaluate.load(str(root / name), keep_in_memory=True)
