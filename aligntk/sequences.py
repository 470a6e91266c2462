"""Token sequences for causal LMs: the label convention, truncation, and padding into batches.

Labels follow the Hugging Face convention: aligned with ``input_ids`` (the loss shifts
them), ``IGNORE_INDEX`` (``-100``) where no loss is taken (prompt, padding). Every data
component truncates with :func:`truncation_cut` and pads with :func:`pad` /
:func:`pad_tokens`, so the policies, their error messages and the padded layout are the
same whichever component built the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from .errors import DataError
from .types import Batch, DataReport

#: The label of a position that is not a target (prompt, padding): ignored by every loss.
IGNORE_INDEX = -100

#: What a data component does with a sequence longer than ``max_length`` (see ``truncation_cut``).
Truncation = Literal["right", "left", "drop", "error"]


# --------------------------------------------------------------------------------------
# Truncating
# --------------------------------------------------------------------------------------


def truncation_cut(
    length: int, prompt_length: int, max_length: int, truncation: Truncation, where: str, report: DataReport
) -> int | None:
    """How many leading tokens to cut from a sequence of ``length`` tokens, or ``None`` to skip it.

    The caller then keeps ``tokens[cut:][:max_length]`` (and the same slice of its labels).
    ``right`` cuts nothing here (the end goes); ``left`` cuts prompt tokens, at most
    ``prompt_length`` of them, so the completion stays (its end is cut only if it alone is
    too long); ``drop`` skips the row (counted in ``report``); ``error`` stops.

    Args:
        length: the sequence's tokens (prompt plus completion; the longer side of a pair).
        prompt_length: how many of them are prompt, at the start.
        max_length: the most tokens kept.
        truncation: the policy.
        where: the row's location (``file:line``), for the error.
        report: where a skipped row is counted.

    Raises:
        DataError: ``truncation`` is ``error`` and the sequence is too long.
    """
    if length <= max_length:
        return 0
    if truncation == "drop":
        report.skip("longer than max_length")
        return None
    if truncation == "error":
        raise DataError(
            f"{where}: {length} tokens, longer than max_length {max_length}; raise data.max_length "
            "or set data.truncation to right, left or drop"
        )
    if truncation == "left":
        return min(length - max_length, prompt_length)
    return 0


def has_targets(labels: Sequence[int], report: DataReport) -> bool:
    """Whether a label list still has a target after truncation; counts the row skipped if not.

    The first label is never a target (nothing predicts it), so it alone teaches nothing.
    """
    if all(label == IGNORE_INDEX for label in labels[1:]):
        report.skip("no completion tokens after truncation")
        return False
    return True


# --------------------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------------------


def pad(
    rows: Sequence[Sequence[int | float]],
    value: int | float,
    *,
    width: int | None = None,
    left: bool = False,
    dtype: torch.dtype = torch.long,
) -> torch.Tensor:
    """Lists of any lengths as one ``[B, T]`` tensor, filled with ``value`` after (or before) each.

    Args:
        rows: ``B`` lists (token ids, labels, per-token floats), none longer than ``width``.
        value: what padding positions hold (the pad id, ``IGNORE_INDEX``, ``0.0`` ...).
        width: ``T``; default: the longest row.
        left: pad in front (generation prompts) instead of after (training rows).
        dtype: the tensor's dtype.

    Returns:
        ``[B, T]`` of ``dtype``.
    """
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            values = torch.tensor(list(row), dtype=dtype)
            if left:
                out[i, width - len(row) :] = values
            else:
                out[i, : len(row)] = values
    return out


def pad_tokens(
    input_ids: Sequence[Sequence[int]],
    pad_id: int,
    labels: Sequence[Sequence[int]] | None = None,
    *,
    width: int | None = None,
    left: bool = False,
) -> Batch:
    """Token id lists (and their labels) as a padded batch.

    Args:
        input_ids: ``B`` token id lists of any lengths.
        pad_id: the id written into padding positions.
        labels: ``B`` label lists, each as long as its ``input_ids`` row, or ``None``.
        width: ``T``; default: the longest row (give one width to several batches that a
            loss concatenates, such as the chosen and rejected sides of preference pairs).
        left: pad in front (generation prompts) instead of after.

    Returns:
        ``input_ids`` ``[B, T]`` (padded with ``pad_id``), ``attention_mask`` ``[B, T]`` (1
        real, 0 padding) and, with ``labels``, ``labels`` ``[B, T]`` (padded with
        ``IGNORE_INDEX``), all int64.
    """
    width = max((len(r) for r in input_ids), default=0) if width is None else width
    lengths = torch.tensor([len(r) for r in input_ids], dtype=torch.long)
    positions = torch.arange(width)[None, :]
    real = positions >= width - lengths[:, None] if left else positions < lengths[:, None]
    batch: Batch = {"input_ids": pad(input_ids, pad_id, width=width, left=left), "attention_mask": real.long()}
    if labels is not None:
        batch["labels"] = pad(labels, IGNORE_INDEX, width=width, left=left)
    return batch


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for ``generate``, so every row's new tokens start at the same column.

    Args:
        prompts: ``B`` token id lists of any lengths (at least one token each).
        pad_id: the id written into padding positions.

    Returns:
        ``input_ids`` ``[B, T]`` (long) and ``attention_mask`` ``[B, T]`` (long, 0 on
        padding), ``T`` the longest prompt.

    Raises:
        DataError: a prompt has no tokens.
    """
    if any(len(p) == 0 for p in prompts):
        raise DataError("an evaluation prompt has no tokens")
    batch = pad_tokens(prompts, pad_id, left=True)
    return batch["input_ids"], batch["attention_mask"]
