"""The ``accuracy`` evaluator: a classifier's predicted class against each example's ground truth."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from pydantic import PositiveInt

from aligntk import Batch, ComponentConfig, DataError, EvaluatorCapabilities, Example, class_probabilities, pad_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: The example fields ``accuracy`` reads: the tokens and the ground-truth class (``classification`` data).
EXAMPLE_FIELDS = frozenset({"input_ids", "label"})


class AccuracyConfig(ComponentConfig):
    """Options of the ``accuracy`` evaluator.

    Attributes:
        batch_size: examples per forward pass.
    """

    batch_size: PositiveInt = 64


class Accuracy:
    """Accuracy of a classifier: the argmax of its class logits vs the ground truth.

    Reads examples with ``input_ids`` and ``label`` (the ``classification`` data of the
    weak-to-strong plugin gives them), and ``label_token_ids`` where a causal LM
    classifies with label tokens (``aligntk.class_logits``).
    """

    Config = AccuracyConfig

    @classmethod
    def capabilities(cls, config: AccuracyConfig) -> EvaluatorCapabilities:
        return EvaluatorCapabilities(requires=EXAMPLE_FIELDS)

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
        missing = EXAMPLE_FIELDS - set(examples[0]) if examples else set()
        if not examples or missing:
            raise DataError(
                "the accuracy evaluator needs classification examples (data 'classification'); "
                + (f"they lack {sorted(missing)}" if examples else "there are none")
            )
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        probs = class_probabilities(model, examples, lambda b: _collate(b, pad_id), self.config.batch_size)
        return probs.argmax(-1).tolist()


def _collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """``input_ids`` and ``attention_mask`` ``[N, T]``, right-padded, and ``label_token_ids`` ``[N, C]`` if any."""
    batch = pad_tokens([ex["input_ids"] for ex in examples], pad_id)
    if "label_token_ids" in examples[0]:
        batch["label_token_ids"] = torch.tensor([ex["label_token_ids"] for ex in examples], dtype=torch.long)
    return batch


def accuracy(predictions: Sequence[int], examples: Sequence[Example]) -> float:
    """The fraction of examples whose ``label`` equals the prediction."""
    return sum(int(p == ex["label"]) for p, ex in zip(predictions, examples)) / len(examples)
