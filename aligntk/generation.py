"""Helpers for sampling from a causal LM: batching prompts for ``generate``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import DataError


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into a batch.

    Args:
        prompts: ``B`` token id lists of any lengths (at least one token each).
        pad_id: the id written into padding positions.

    Returns:
        ``input_ids`` ``[B, T]`` (long) and ``attention_mask`` ``[B, T]`` (long, 0 on
        padding), ``T`` the longest prompt.
    """
    if any(len(p) == 0 for p in prompts):
        raise DataError("an evaluation prompt has no tokens")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention_mask[row, width - len(p) :] = 1
    return input_ids, attention_mask
