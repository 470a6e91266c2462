"""Labelling with a frozen classifier, once per example, and the ``accuracy`` evaluator.

The weak supervisor's probabilities are computed in one pass over the examples and
written to a labels file in the run folder; training runs read that file, so however
many epochs the student trains, the teacher's forward pass runs once per example.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import PositiveInt

from aligntk import Batch, ComponentConfig, DataError, Example

from .data import class_logits, collate_classification

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: The file the protocol writes the weak supervisor's labels into, in the weak run's folder.
LABELS_FILE = "weak_labels.jsonl"


@torch.no_grad()
def label_examples(
    model: torch.nn.Module,
    examples: Sequence[Example],
    collate: Callable[[Sequence[Example]], Batch],
    batch_size: int = 64,
) -> torch.Tensor:
    """The classifier's class probabilities for each example, in one pass.

    Args:
        model: a sequence-classification model (``model(input_ids, attention_mask).logits``
            ``[B, C]``); put in eval mode for the pass and restored after.
        examples: the examples to label.
        collate: turns a list of examples into a batch with ``input_ids`` and ``attention_mask``.
        batch_size: examples per forward pass.

    Returns:
        ``[N, C]`` float32 probabilities, on the CPU, in the examples' order.
    """
    if not examples:
        raise DataError("there are no examples to label")
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))])
            logits = class_logits(model, batch)
            out.append(torch.softmax(logits.float(), dim=-1).cpu())  # float32 softmax, as the losses do
    finally:
        model.train(was_training)
    return torch.cat(out)


def write_labels(path: Path, probs: torch.Tensor) -> Path:
    """Write ``[N, C]`` probabilities as JSON Lines ``{"index": i, "probs": [...]}`` (what ``soft_labels_path`` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Renormalize after rounding so every row still sums to 1 within the reader's tolerance.
    rows = probs.double() / probs.double().sum(-1, keepdim=True)
    with path.open("w") as f:
        for i, row in enumerate(rows.tolist()):
            f.write(json.dumps({"index": i, "probs": row}) + "\n")
    return path


class AccuracyConfig(ComponentConfig):
    """Options of the ``accuracy`` evaluator.

    Attributes:
        batch_size: examples per forward pass.
    """

    batch_size: PositiveInt = 64


class Accuracy:
    """Accuracy of a sequence-classification model: argmax of its logits vs the ground truth.

    Reads the examples of the ``classification`` data (``input_ids`` and ``label``).
    """

    Config = AccuracyConfig

    def __init__(self, config: AccuracyConfig | None = None):
        self.config = config if config is not None else AccuracyConfig()

    def __call__(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
    ) -> dict[str, float]:
        return {"accuracy": accuracy(self.predict(model, tokenizer, examples), examples)}

    def predict(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
    ) -> list[int]:
        """The predicted class of each example (``[N]`` as a list)."""
        missing = {"input_ids", "label", "soft_labels"} - set(examples[0]) if examples else set()
        if not examples or missing:
            raise DataError(
                "the accuracy evaluator needs classification examples (data 'classification'); "
                + (f"they lack {sorted(missing)}" if examples else "there are none")
            )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        probs = label_examples(model, examples, lambda b: collate_classification(b, pad), self.config.batch_size)
        return probs.argmax(-1).tolist()


def accuracy(predictions: Sequence[int], examples: Sequence[Example]) -> float:
    """The fraction of examples whose ``label`` equals the prediction."""
    return sum(int(p == ex["label"]) for p, ex in zip(predictions, examples)) / len(examples)
