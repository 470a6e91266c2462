"""Built-in update steps: full fine-tuning (the default), L2-SP, LoRA and prompt tuning.

Every step shares ``UpdateOptions`` (optimizer, schedule, clipping, per-group rates,
and ``freeze`` / ``freeze_layers``), so freezing composes with any strategy and any
loss. ``aligntk merge`` folds a saved LoRA adapter into its base model.
"""

from __future__ import annotations

from typing import Any

from aligntk import Register, hookimpl

from .adapters import LoRA, PeftPolicy, PromptTuning
from .base import L2SP, FullFineTuning, UpdateBase
from .merge import load_adapter, merge_adapter, merge_command
from .options import UpdateOptions

#: The original name of the full step's options, kept for code that imported it.
FullFineTuningConfig = UpdateOptions

__all__ = [
    "L2SP",
    "FullFineTuning",
    "FullFineTuningConfig",
    "LoRA",
    "PeftPolicy",
    "PromptTuning",
    "UpdateBase",
    "UpdateOptions",
    "load_adapter",
    "merge_adapter",
]


@hookimpl
def aligntk_register_update_steps(register: Register) -> None:
    register("full", FullFineTuning)
    register("l2sp", L2SP)
    register("lora", LoRA)
    register("prompt_tuning", PromptTuning)


@hookimpl
def aligntk_register_commands(cli: Any) -> None:
    cli.add_command(merge_command)
