"""Supervised fine-tuning loss: token cross-entropy on the output tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aligntk import ComponentConfig, LossOutput, Models
from aligntk.types import Batch

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood over labelled positions.

    Position ``t`` predicts label ``t + 1``; labels equal to ``-100`` (prompt, padding)
    contribute nothing. Logits are upcast to float32 before the softmax.

    Args:
        logits: ``[B, T, V]`` model outputs.
        labels: ``[B, T]`` target ids, ``-100`` where no loss is taken.

    Returns:
        ``(sum, count)``: the summed loss (scalar) and the number of labelled tokens.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (shift_labels != IGNORE_INDEX).sum()


class SFTLossConfig(ComponentConfig):
    """The SFT loss has no options: which tokens count is the data's choice (labels)."""


class SFTLoss:
    """``-log Pr(y | x)`` summed over output tokens; the engine divides by the token count."""

    Config = SFTLossConfig
    requires = frozenset({"input_ids", "attention_mask", "labels"})
    roles = ("policy",)

    def __init__(self, config: SFTLossConfig):
        self.config = config

    def count(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        out = models.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        loss_sum, count = token_nll(out.logits, batch["labels"])
        return LossOutput(sum=loss_sum, count=count)
