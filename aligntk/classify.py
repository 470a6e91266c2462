"""Class scores from a classifier: a sequence-classification head, or a causal LM's label tokens.

Losses, teacher labelling and the ``accuracy`` evaluator read a classifier the same way,
through :func:`class_logits`; :func:`class_probabilities` runs one pass over examples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .errors import DataError
from .types import Batch, Example


def class_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Class logits ``[N, C]`` from a classification head, or from a causal LM's label tokens.

    Args:
        model: a sequence-classification model (``logits`` ``[N, C]``), or a causal LM
            when the batch holds ``label_token_ids``.
        batch: ``input_ids`` and ``attention_mask`` ``[N, T]``, right-padded; optionally
            ``label_token_ids`` ``[N, C]``, one token id per class.

    Returns:
        ``[N, C]`` logits on the model's device. With ``label_token_ids``, the LM's
        next-token logits after each row's last real token, at the label tokens.
    """
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    ids = batch.get("label_token_ids")
    if ids is None:
        return out
    last = batch["attention_mask"].to(device).sum(dim=1) - 1
    return out[torch.arange(out.size(0), device=device), last].gather(-1, ids.to(device))


@torch.no_grad()
def class_probabilities(
    model: torch.nn.Module,
    examples: Sequence[Example],
    collate: Callable[[Sequence[Example]], Batch],
    batch_size: int = 64,
) -> torch.Tensor:
    """The classifier's class probabilities for each example, in one pass.

    Args:
        model: a classifier as ``class_logits`` reads it; put in eval mode for the pass
            and restored after.
        examples: the examples to label.
        collate: turns a list of examples into a batch with ``input_ids`` and ``attention_mask``.
        batch_size: examples per forward pass.

    Returns:
        ``[N, C]`` float32 probabilities (softmax in float32), on the CPU, in the examples' order.

    Raises:
        DataError: there are no examples.
    """
    if not examples:
        raise DataError("there are no examples to label")
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))])
            out.append(torch.softmax(class_logits(model, batch).float(), dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
