"""Keeping parameters fixed by name pattern or by transformer-block range, and saying what trains."""

from __future__ import annotations

import logging
import re

import torch

from .optim import name_matches

log = logging.getLogger("aligntk")

# Block containers across architectures: llama/mistral/qwen ``layers``, gpt2 ``h``, bert ``layer``.
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The transformer-block index in a parameter name, or ``None`` (embeddings, head, final norm)."""
    found = _BLOCK.search(name)
    return int(found.group(1)) if found else None


def _bound(text: str, n: int, default: int) -> int:
    text = text.strip()
    if not text:
        return default
    if text.endswith("%"):
        return round(n * int(text[:-1]) / 100)
    value = int(text)
    return value + n if value < 0 else value


def layer_range(spec: str, n_blocks: int) -> range:
    """Block indices of a ``start:end`` slice; bounds may be ints (negative from the end) or percentages."""
    start, _, end = spec.partition(":")
    return range(max(0, _bound(start, n_blocks, 0)), min(n_blocks, _bound(end, n_blocks, n_blocks)))


def apply_freeze(model: torch.nn.Module, patterns: list[str], layers: str | None) -> list[str]:
    """Set ``requires_grad=False`` on matching parameters; return the names frozen here."""
    named = list(model.named_parameters())
    blocks: range = range(0)
    if layers is not None:
        n_blocks = 1 + max((i for i in map(block_index, (n for n, _ in named)) if i is not None), default=-1)
        blocks = layer_range(layers, n_blocks)
    frozen = []
    for name, param in named:
        hit = any(name_matches(name, p) for p in patterns) or block_index(name) in blocks
        if hit and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def log_trainable(model: torch.nn.Module, strategy: str) -> tuple[int, int]:
    """Log (and return) the trainable and total parameter counts after ``prepare``."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    share = 100 * trainable / total if total else 0.0
    log.info("update %s: training %s of %s parameters (%.3g%%)", strategy, f"{trainable:,}", f"{total:,}", share)
    return trainable, total
