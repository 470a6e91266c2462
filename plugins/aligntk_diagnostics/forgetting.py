"""Forgetting, measured: perplexity on general held-out text, and relative parameter drift.

The engine runs evaluators before training (step 0), every ``train.eval_every`` steps
and at the end, so each evaluator's first call sees the starting model: both keep
what they measured then and report the change since.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from pydantic import PositiveInt

from aligntk import ComponentConfig, DataError, Example, LocalFile, token_logps

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def read_texts(path: LocalFile, limit: int | None) -> list[str]:
    """Texts from a JSONL file (a ``text`` field per line) or a plain file (one text per non-empty line)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(lines, start=1):
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{number}: expected an object with a 'text' string")
            texts.append(row["text"])
    else:
        texts = lines
    if not texts:
        raise DataError(f"{path}: no text to measure perplexity on")
    return texts[:limit] if limit else texts


class GeneralPerplexity:
    """Perplexity of the policy on a general text file, and its ratio to the value before training.

    Reports ``general_ppl`` (exp of the mean token negative log-likelihood over every
    predicted token) and ``general_ppl_ratio`` (this value over the first one
    measured; above 1 means the model got worse at general text: forgetting).
    """

    class Config(ComponentConfig):
        """Options of the ``perplexity`` evaluator.

        Attributes:
            path: ``.jsonl`` with a ``text`` field per line, or a text file, one text per line.
            max_length: tokens kept per text.
            batch_size: texts per forward pass.
            limit: use only the first ``limit`` texts.
        """

        path: LocalFile
        max_length: PositiveInt = 512
        batch_size: PositiveInt = 8
        limit: PositiveInt | None = None

    def __init__(self, config: Config):
        self.config = config
        self.texts = read_texts(config.path, config.limit)
        self.first: float | None = None

    def __call__(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
    ) -> dict[str, float]:
        device = next(model.parameters()).device
        nll, count = 0.0, 0
        for start in range(0, len(self.texts), self.config.batch_size):
            chunk = self.texts[start : start + self.config.batch_size]
            enc = tokenizer(
                chunk, truncation=True, max_length=self.config.max_length, padding=True, return_tensors="pt"
            )
            # Every real token after the first is a target (token_logps: targets from the mask).
            out = token_logps(model, enc["input_ids"].to(device), enc["attention_mask"].to(device), chunk_size="auto")
            nll -= out.logps.sum().item()
            count += int(out.mask.sum())
        if count == 0:
            raise DataError(f"{self.config.path}: no text has two tokens or more")
        ppl = math.exp(nll / count)
        if self.first is None:
            self.first = ppl
        return {"general_ppl": ppl, "general_ppl_ratio": ppl / self.first}


class ParameterDrift:
    """Relative drift of the weights from where they started: ``||theta - theta_0|| / ||theta_0||``.

    Over every parameter of the policy as the evaluator sees it (for an adapter, that
    is the adapter's weights and the frozen base). The snapshot ``theta_0`` is a
    float32 CPU copy taken at the first call, which the engine makes before training.
    """

    class Config(ComponentConfig):
        """The ``drift`` evaluator has no options."""

    def __init__(self, config: Config):
        self.config = config
        self.start: dict[str, torch.Tensor] = {}

    def __call__(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
    ) -> dict[str, float]:
        params = dict(model.named_parameters())
        if not self.start:
            self.start = {n: p.detach().float().cpu().clone() for n, p in params.items()}
        moved = base = 0.0
        for name, p0 in self.start.items():
            p = params[name].detach().float().cpu()
            moved += (p - p0).pow(2).sum().item()
            base += p0.pow(2).sum().item()
        return {"drift": math.sqrt(moved) / math.sqrt(base) if base > 0 else 0.0}
