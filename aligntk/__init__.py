"""aligntk: fine-tune pre-trained language models; every method is a plugin on one engine.

The public API for plugin authors is what this module exports.
"""

from __future__ import annotations

from .errors import AligntkError, DataError, PluginError, RecipeError, TrainingError
from .plugins import hookimpl, load_plugins
from .recipe import LocalFile, LocalPath
from .types import (
    Batch,
    ComponentConfig,
    DataComponent,
    DataContext,
    DataReport,
    DataSplits,
    Evaluator,
    Example,
    LossComponent,
    LossOutput,
    Models,
    RewardComponent,
    RunInfo,
    UpdateStep,
)

__version__ = "0.1.0"

__all__ = [
    "AligntkError",
    "Batch",
    "ComponentConfig",
    "DataComponent",
    "DataContext",
    "DataError",
    "DataReport",
    "DataSplits",
    "Evaluator",
    "Example",
    "LocalFile",
    "LocalPath",
    "LossComponent",
    "LossOutput",
    "Models",
    "PluginError",
    "RecipeError",
    "RewardComponent",
    "RunInfo",
    "TrainingError",
    "UpdateStep",
    "hookimpl",
    "load_plugins",
]
