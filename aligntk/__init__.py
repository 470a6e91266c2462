"""aligntk: fine-tune pre-trained language models; every method is a plugin on one engine.

The public API is what this module exports (``__all__``), plus the test harness
``aligntk.testing``. Built-in plugins import nothing else from aligntk, exactly as a
third-party plugin would (``tests/test_public_api.py`` checks it); if a plugin needs
something more, it belongs here. ``aligntk.hookspecs`` documents the hooks, but its
callback types (``Register`` ...) are exported here, so there is one place to import from.

Names from modules that load transformers or the engine (log-probs, models, ``train``)
are imported on first use, so ``import aligntk`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .answers import named_choice
from .chat import check_messages, normalize_messages, render_chat
from .classify import class_logits, class_probabilities
from .datafiles import DataFile, FileDataConfig, describe_type, keep_fitting, load_splits, read_rows, require_pad_token
from .errors import AligntkError, DataError, PluginError, RecipeError, TrainingError
from .hookspecs import Register, RegisterOptions, RegisterPart, RegisterSuite
from .metrics import available_metrics, load_metric
from .parts import Part, part
from .plugins import Plugins, hookimpl, load_plugins
from .recipe import ComponentSpec, LocalFile, LocalPath, format_errors, read_recipe, validate_recipe
from .seeds import sample_seed
from .sequences import IGNORE_INDEX, Truncation, has_targets, left_pad, pad, pad_tokens, truncation_cut
from .types import (
    Batch,
    ComponentConfig,
    DataCapabilities,
    DataComponent,
    DataContext,
    DataReport,
    DataSplits,
    Evaluator,
    EvaluatorCapabilities,
    Example,
    LossCapabilities,
    LossComponent,
    LossContext,
    LossOutput,
    Models,
    RewardComponent,
    RunInfo,
    Sample,
    UpdateStep,
)

if TYPE_CHECKING:
    from .api import run_resolved, train
    from .divergences import Divergence, kl_divergence, token_divergence
    from .logprobs import ChunkSize, TokenLogps, logps_from_logits, prepends_positions, token_logps
    from .models import frozen_copy, unwrap

__version__ = "0.1.0"

#: Public names whose modules load transformers or the engine: imported on first access.
_LAZY: dict[str, str] = {
    "Divergence": "divergences",
    "kl_divergence": "divergences",
    "token_divergence": "divergences",
    "ChunkSize": "logprobs",
    "TokenLogps": "logprobs",
    "logps_from_logits": "logprobs",
    "prepends_positions": "logprobs",
    "token_logps": "logprobs",
    "frozen_copy": "models",
    "unwrap": "models",
    "run_resolved": "api",
    "train": "api",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aligntk' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    # Errors: each reaches the user as one line naming the file, row or recipe key.
    "AligntkError",
    "DataError",
    "PluginError",
    "RecipeError",
    "TrainingError",
    # Plugins: the hook marker, the registration callbacks' types, the loaded plugins.
    "Plugins",
    "Register",
    "RegisterOptions",
    "RegisterPart",
    "RegisterSuite",
    "hookimpl",
    "load_plugins",
    # Component protocols, what they declare, and the values they exchange with the engine.
    "Batch",
    "ComponentConfig",
    "DataCapabilities",
    "DataComponent",
    "DataContext",
    "DataReport",
    "DataSplits",
    "Evaluator",
    "EvaluatorCapabilities",
    "Example",
    "LossCapabilities",
    "LossComponent",
    "LossContext",
    "LossOutput",
    "Models",
    "RewardComponent",
    "RunInfo",
    "Sample",
    "UpdateStep",
    # Component options: local paths, and nested parts chosen by name (aligntk_register_parts).
    "LocalFile",
    "LocalPath",
    "Part",
    "part",
    # Data files: rows with their location, train/eval splits, row and tokenizer checks.
    "DataFile",
    "FileDataConfig",
    "describe_type",
    "keep_fitting",
    "load_splits",
    "read_rows",
    "require_pad_token",
    # Token sequences: the label convention, truncation, padding into batches.
    "IGNORE_INDEX",
    "Truncation",
    "has_targets",
    "left_pad",
    "pad",
    "pad_tokens",
    "truncation_cut",
    # Chat rows: checking messages, rendering them with the chat template.
    "check_messages",
    "normalize_messages",
    "render_chat",
    # Models and their outputs: token log-probs (chunked or plain, one dispatch), class scores, wrappers.
    "ChunkSize",
    "TokenLogps",
    "class_logits",
    "class_probabilities",
    "frozen_copy",
    "logps_from_logits",
    "prepends_positions",
    "token_logps",
    "unwrap",
    # Generated answers: the choice a text names (rewards and evaluators grade by one rule).
    "named_choice",
    # Sampling: seeds that depend on the run, the rollout and the prompt (not on batches or processes).
    "sample_seed",
    # Divergences between next-token distributions (distillation: w2s, GKD).
    "Divergence",
    "kl_divergence",
    "token_divergence",
    # Metrics shipped as local evaluate modules (aligntk's, or a plugin's own folder).
    "available_metrics",
    "load_metric",
    # Runs: ``train`` from Python (recipe plus in-memory model, datasets, reward functions);
    # ``run_resolved``, the engine's run of a validated recipe, for commands (the weak-to-strong protocol).
    "ComponentSpec",
    "format_errors",
    "read_recipe",
    "run_resolved",
    "train",
    "validate_recipe",
]
