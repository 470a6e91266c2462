"""aligntk: fine-tune pre-trained language models; every method is a plugin on one engine.

The public API for plugin authors is what this module exports.
"""

from __future__ import annotations

from .errors import AligntkError, DataError, PluginError, RecipeError, TrainingError
from .plugins import hookimpl, load_plugins
from .recipe import LocalFile, LocalPath
from .parts import Part, part
from .types import (
    AdvantageEstimator,
    Aggregation,
    Batch,
    ComponentConfig,
    DataComponent,
    DataContext,
    DataReport,
    DataSplits,
    Evaluator,
    Example,
    KLEstimator,
    LossComponent,
    LossOutput,
    Models,
    RewardComponent,
    RunInfo,
    Scored,
    UpdateStep,
)

__version__ = "0.1.0"

__all__ = [
    "AdvantageEstimator",
    "Aggregation",
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
    "KLEstimator",
    "LocalFile",
    "LocalPath",
    "LossComponent",
    "LossOutput",
    "Models",
    "Part",
    "PluginError",
    "RecipeError",
    "RewardComponent",
    "RunInfo",
    "Scored",
    "TrainingError",
    "UpdateStep",
    "hookimpl",
    "load_plugins",
    "part",
]
