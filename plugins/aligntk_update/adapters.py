"""Adapter update steps through peft: LoRA, prompt tuning and prompt+LM tuning.

``prepare`` wraps the policy in ``PeftPolicy``, a thin module around the peft model
that (a) drops the logits of the virtual tokens prompt tuning prepends, so every
loss sees logits ``[B, T, V]`` aligned with its labels, and declares them as
``prepended_positions`` (what ``aligntk.prepends_positions`` reads), and (b) saves a peft adapter
at the end of the run, plus the base model when it cannot be found again (built from
a config, or trained itself by prompt+LM tuning), so ``aligntk merge`` can rebuild it.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from aligntk import AligntkError

from .base import UpdateBase
from .options import UpdateOptions

log = logging.getLogger("aligntk")

#: Sub-folder of a saved adapter that holds the base model, when the adapter needs one.
BASE_FOLDER = "base"


def _task_type(model: torch.nn.Module) -> str:
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


def _has_local_source(model: torch.nn.Module) -> bool:
    source = getattr(model, "name_or_path", "") or ""
    return bool(source) and Path(source).is_dir()


class PeftPolicy(torch.nn.Module):
    """A peft model whose outputs line up with its inputs, and whose save writes what merging needs.

    Attributes:
        peft_model: the ``peft.PeftModel``. (Not called ``module``: ``aligntk``'s
            ``unwrap`` would take it for a DDP wrapper and strip this class.)
        prepended_positions: positions peft prepends (prompt tuning's virtual tokens),
            dropped from ``logits``; the core's declaration that this model prepends
            positions (``aligntk.prepends_positions``), so log-probs take the plain path
            and packed rows are refused.
        base: a copy of the untouched base model to save next to the adapter, or ``None``.
        save_trained_base: save the wrapped (trained) base model instead (prompt+LM tuning).
    """

    def __init__(
        self,
        peft_model: torch.nn.Module,
        virtual_tokens: int = 0,
        base: torch.nn.Module | None = None,
        save_trained_base: bool = False,
    ):
        super().__init__()
        self.peft_model = peft_model
        self.prepended_positions = virtual_tokens
        # Kept in a list, outside the module tree: never trained, moved to the device
        # or written into checkpoints.
        self._base = [base] if base is not None else []
        self._save_trained_base = save_trained_base

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.peft_model(*args, **kwargs)
        logits = getattr(out, "logits", None)
        if self.prepended_positions and logits is not None and logits.dim() == 3:
            out.logits = logits[:, self.prepended_positions :]
        return out

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.peft_model.generate(*args, **kwargs)

    def save_pretrained(self, folder: str | Path, **kwargs: Any) -> None:
        """The peft adapter in ``folder``; the base model in ``folder/base`` when it is not on disk."""
        folder = Path(folder)
        self.peft_model.save_pretrained(folder, **kwargs)
        if self._save_trained_base:  # prompt+LM tuning: the base itself was trained
            self.peft_model.get_base_model().save_pretrained(folder / BASE_FOLDER)
        elif self._base:
            self._base[0].save_pretrained(folder / BASE_FOLDER)
        _record_base(folder)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "peft_model":
                raise
            return getattr(self.peft_model, name)  # config, gradient checkpointing, ... of the peft model


def _record_base(folder: Path) -> None:
    """Name the base model in ``adapter_config.json`` by an absolute path when it is on disk, so
    ``peft.AutoPeftModelForCausalLM.from_pretrained(folder)`` finds it offline from any directory.

    The engine writes ``run/.tmp-model`` and renames it to ``run/model``: the path recorded is the
    final one. (aligntk itself prefers ``folder/base`` and reads relative paths from ``folder``.)
    """
    import json

    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    final = folder.parent / folder.name.removeprefix(".tmp-")
    if (folder / BASE_FOLDER).is_dir():
        named: str | None = str((final / BASE_FOLDER).absolute())
    else:
        source = config.get("base_model_name_or_path")
        named = str(Path(source).absolute()) if source and Path(source).is_dir() else source
    if named != config.get("base_model_name_or_path"):
        config["base_model_name_or_path"] = named
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class LoRAConfig(UpdateOptions):
    """Options of ``lora``: the shared options plus the adapter's shape.

    Attributes:
        rank: rank of the update matrices (peft's ``r``).
        alpha: scaling numerator (the update is scaled by ``alpha / rank``).
        dropout: dropout on the adapter's input.
        target_modules: module names (or ``all-linear``) to adapt; ``null`` uses
            peft's default for the architecture.
        bias: which biases train: ``none``, ``all`` or ``lora_only``.
        modules_to_save: other modules trained in full and saved with the adapter.
    """

    learning_rate: PositiveFloat = 2e-4
    rank: PositiveInt = 8
    alpha: PositiveFloat = 16
    dropout: NonNegativeFloat = Field(0.0, lt=1)
    target_modules: list[str] | Literal["all-linear"] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None


class LoRA(UpdateBase):
    """Low-rank adapters (Hu et al. 2021, arXiv:2106.09685) via ``peft.get_peft_model``."""

    Config = LoRAConfig
    strategy = "lora"
    continues_adapter = True

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import LoraConfig, PeftModel, get_peft_model

        c: LoRAConfig = self.config  # type: ignore[assignment]
        if isinstance(model, PeftModel):  # model.adapter: continue: train the loaded adapter, add none
            kind = model.peft_config[model.active_adapter].peft_type
            if kind != "LORA":
                raise AligntkError(f"update lora: model.adapter: continue loaded a {kind} adapter, not a LoRA one")
            log.info("update lora: continuing the loaded adapter (its rank and targets; update.rank etc. unused)")
            return PeftPolicy(model)
        base = None if _has_local_source(model) else copy.deepcopy(model)
        peft_config = LoraConfig(
            task_type=_task_type(model),
            r=c.rank,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=c.target_modules,
            bias=c.bias,
            modules_to_save=c.modules_to_save,
        )
        return PeftPolicy(get_peft_model(model, peft_config), base=base)


class PromptTuningConfig(UpdateOptions):
    """Options of ``prompt_tuning``: the shared options plus the soft prompt.

    Attributes:
        num_virtual_tokens: length of the soft prompt prepended to every sequence.
        init: ``random`` embeddings, or ``sample_vocab`` (copies of random token embeddings).
        tune_model: also train the model's own weights (prompt+LM tuning); give the
            prompt its own rate with ``learning_rates: {prompt_encoder: ...}``.
    """

    learning_rate: PositiveFloat = 3e-2
    num_virtual_tokens: PositiveInt = 20
    init: Literal["random", "sample_vocab"] = "random"
    tune_model: bool = False


class PromptTuning(UpdateBase):
    """Soft prompt tuning (Lester et al. 2021, arXiv:2104.08691) via peft; the model stays frozen.

    With ``tune_model: true`` the model trains too (prompt+LM tuning), and the trained
    model is saved in ``model/base`` next to the prompt.
    """

    Config = PromptTuningConfig
    strategy = "prompt_tuning"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import PromptTuningConfig as PeftPromptConfig, PromptTuningInit, get_peft_model

        c: PromptTuningConfig = self.config  # type: ignore[assignment]
        task = _task_type(model)
        if task != "CAUSAL_LM":
            raise AligntkError("update prompt_tuning: supports causal language models only (model.task: causal_lm)")
        base = None if _has_local_source(model) or c.tune_model else copy.deepcopy(model)
        init = PromptTuningInit.RANDOM if c.init == "random" else PromptTuningInit.SAMPLE_VOCAB
        peft_config = PeftPromptConfig(task_type=task, num_virtual_tokens=c.num_virtual_tokens, prompt_tuning_init=init)
        peft_model = get_peft_model(model, peft_config)
        if c.tune_model:
            peft_model.get_base_model().requires_grad_(True)
        return PeftPolicy(peft_model, c.num_virtual_tokens, base=base, save_trained_base=c.tune_model)
