"""Load, build, freeze and save models and tokenizers through the transformers Auto classes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from .errors import AligntkError
from .recipe import ModelSpec

_AUTO_CLASSES = {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _source(name: str, base_dir: Path) -> str:
    """A local folder (relative to the recipe) when one exists, else the name as a hub id."""
    local = Path(name).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    if local.exists():
        return str(local)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise AligntkError(f"{name}: no such model or tokenizer folder (looked in {local})")
    return name


def load_tokenizer(spec: ModelSpec, base_dir: Path, key: str = "model") -> PreTrainedTokenizerBase:
    """The tokenizer named by ``spec.tokenizer`` (or ``spec.path``), with a pad token."""
    name = spec.tokenizer or spec.path
    assert name is not None  # the recipe validator guarantees one of them
    source = _source(name, base_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise AligntkError(f"{key}.tokenizer: cannot load a tokenizer from {source}: {exc}".splitlines()[0]) from None
    if spec.pad_token is not None:
        tokenizer.pad_token = spec.pad_token
    if tokenizer.pad_token_id is None:
        raise AligntkError(
            f"{key}.tokenizer: the tokenizer at {source} has no pad token; set {key}.pad_token in the recipe "
            f"(for example {key}.pad_token: {tokenizer.eos_token!r})"
        )
    return tokenizer


def build_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, base_dir: Path, key: str = "model") -> torch.nn.Module:
    """A model from a local folder (or hub id), or built from ``spec.config`` with random weights."""
    auto = _AUTO_CLASSES[spec.task]
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.num_labels is not None:
        kwargs["num_labels"] = spec.num_labels
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        if spec.config is not None:
            options = dict(spec.config)
            options.setdefault("vocab_size", len(tokenizer))
            if "num_labels" in kwargs:
                options["num_labels"] = kwargs.pop("num_labels")
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                options.setdefault(name, getattr(tokenizer, name))
            config = AutoConfig.for_model(**options)
            model = auto.from_config(config, **kwargs)
        else:
            assert spec.path is not None
            model = auto.from_pretrained(_source(spec.path, base_dir), dtype=_DTYPES[spec.dtype], **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        where = f"{key}.config" if spec.config is not None else f"{key}.path"
        raise AligntkError(f"{where}: cannot build the model: {exc}".splitlines()[0]) from None
    model.to(_DTYPES[spec.dtype])
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


class Frozen(torch.nn.Module):
    """A model that never trains: eval mode, no gradients, calls run under ``torch.no_grad()``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def train(self, mode: bool = True) -> Frozen:
        return self  # stays in eval mode whatever the engine does to the policy

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)  # config, generate, ... of the wrapped model


def frozen_copy(model: torch.nn.Module) -> Frozen:
    """A frozen copy of ``model`` as it is now (the default reference model)."""
    return Frozen(copy.deepcopy(model))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


#: Name of the submodule holding the losses' trainable heads inside the policy.
HEADS = "aligntk_heads"


def attach_heads(model: torch.nn.Module, heads: dict[str, torch.nn.Module]) -> None:
    """Make ``heads`` part of the policy: trained, clipped and checkpointed with it."""
    if heads:
        unwrap(model).add_module(HEADS, torch.nn.ModuleDict(heads))


def heads_of(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    found = getattr(unwrap(model), HEADS, None)
    return dict(found.items()) if found is not None else {}


def save_pretrained(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Save in Hugging Face format (safetensors) so transformers ``from_pretrained`` loads it back.

    Trainable heads are not part of the Hugging Face model: they go to ``heads.safetensors``.
    """
    from safetensors.torch import save_model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the run's own progress output is enough
    inner = unwrap(model)
    heads = inner._modules.pop(HEADS, None)
    try:
        inner.save_pretrained(folder)
    finally:
        if heads is not None:
            inner.add_module(HEADS, heads)
    if heads is not None:
        save_model(heads, str(Path(folder) / "heads.safetensors"))
    tokenizer.save_pretrained(folder)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(unwrap(model).parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
