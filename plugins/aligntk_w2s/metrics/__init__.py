"""The weak-to-strong plugin's metrics, shipped as local ``evaluate`` modules: ``pgr``.

Each lives in ``metrics/<name>/<name>.py`` (package data of this plugin) and is loaded by
path through ``aligntk.load_metric``, so nothing is fetched from the Hugging Face Hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import aligntk

if TYPE_CHECKING:
    import evaluate

#: The folder holding this plugin's metric modules.
METRICS = Path(__file__).parent


def available_metrics() -> list[str]:
    """The names of the metric modules this plugin ships, sorted."""
    return aligntk.available_metrics(METRICS)


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load one of this plugin's metrics (``"pgr"``), once per process."""
    return aligntk.load_metric(name, METRICS)
