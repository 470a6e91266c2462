"""Supervised fine-tuning loss: token cross-entropy on the output tokens only."""

from __future__ import annotations

import torch

from aligntk import (
    IGNORE_INDEX,
    Batch,
    ChunkSize,
    ComponentConfig,
    LossOutput,
    Models,
    TrainingError,
    logps_from_logits,
    prepends_positions,
    token_logps,
)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood over labelled positions (``aligntk.logps_from_logits``).

    Position ``t`` predicts label ``t + 1``; labels equal to ``-100`` (prompt, padding)
    contribute nothing. Logits are upcast to float32 before the softmax.

    Args:
        logits: ``[B, T, V]`` model outputs.
        labels: ``[B, T]`` target ids, ``-100`` where no loss is taken.

    Returns:
        ``(sum, count)``: the summed loss (scalar) and the number of labelled tokens.
    """
    return -logps_from_logits(logits, labels).logps.sum(), (labels[:, 1:] != IGNORE_INDEX).sum()


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """``input_ids`` and whichever of ``attention_mask`` / ``position_ids`` the batch has.

    A packed batch (``sft`` data with ``packing: true``) has ``position_ids`` restarting at 0
    for each sequence and no ``attention_mask``: transformers then builds a block-diagonal
    causal mask from the positions, so no token attends across a sequence boundary.
    """
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


class SFTLossConfig(ComponentConfig):
    """Options of the ``sft`` loss (which tokens count is the data's choice: its labels).

    Attributes:
        chunk_size: apply the output layer to this many labelled tokens at a time
            (``aligntk.token_logps``), so full ``[B, T, V]`` float32 logits never exist, in the
            forward or the backward pass. ``0`` computes the full logits (the plain path);
            ``auto`` chunks by 1024 from a 16k vocabulary up (``resolve_chunk_size``).
    """

    chunk_size: ChunkSize = "auto"


class SFTLoss:
    """``-log Pr(y | x)`` summed over output tokens; the engine divides by the token count."""

    Config = SFTLossConfig
    requires = frozenset({"input_ids", "labels"})  # and attention_mask or (packed) position_ids
    roles = ("policy",)

    def __init__(self, config: SFTLossConfig):
        self.config = config

    def count(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        inputs = model_inputs(batch)
        if "position_ids" in inputs and prepends_positions(models.policy):
            raise TrainingError(
                "data.packing does not work with prompt tuning: peft drops position_ids, so packed "
                "sequences would attend to each other; set data.packing: false"
            )
        logps = token_logps(models.policy, **inputs, labels=batch["labels"], chunk_size=self.config.chunk_size)
        return LossOutput(sum=-logps.logps.sum(), count=self.count(batch))
