"""Rule-based rewards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field, PositiveInt

from aligntk import ComponentConfig, LocalFile, named_choice


class ExactAnswerConfig(ComponentConfig):
    """Options of the ``exact_answer`` reward (none: whitespace at the ends is ignored)."""


class ExactAnswer:
    """1.0 when the completion equals the example's reference answer, else 0.0."""

    Config = ExactAnswerConfig

    def __init__(self, config: ExactAnswerConfig):
        self.config = config

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> torch.Tensor:
        references = fields.get("references")
        if references is None:
            raise ValueError("exact_answer needs the data's reference answers")
        return torch.tensor([float(c.strip() == r.strip()) for c, r in zip(completions, references)])


class ChoiceAnswerConfig(ComponentConfig):
    """Options of the ``choice`` reward.

    Attributes:
        choices: the possible answers (at least two), such as ``[positive, negative]``.
    """

    choices: list[str] = Field(min_length=2)


class ChoiceAnswer:
    """1.0 when the completion names exactly one of the choices and it is the reference answer.

    The answer is read out of free text with :func:`aligntk.named_choice` (whole word, case
    ignored): ``The word "dismal" is negative.`` earns 1 for the reference ``negative``; a
    completion naming no choice, or both ("positive or negative"), earns 0. The
    ``choice_match`` evaluator grades held-out answers by the same rule.
    """

    Config = ChoiceAnswerConfig

    def __init__(self, config: ChoiceAnswerConfig):
        self.config = config

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> torch.Tensor:
        references = fields.get("references")
        if references is None:
            raise ValueError("the choice reward needs the data's reference answers")
        scores = []
        for completion, reference in zip(completions, references):
            answer = named_choice(completion, self.config.choices)
            scores.append(float(answer is not None and answer == named_choice(reference, self.config.choices)))
        return torch.tensor(scores)


class RewardModelScoreConfig(ComponentConfig):
    """Options of the ``reward_model`` reward.

    Attributes:
        path: a folder with a trained one-score sequence-classification model and its
            tokenizer (the ``model`` folder of a ``reward_model`` loss run).
        batch_size: texts scored together.
    """

    path: LocalFile
    batch_size: PositiveInt = 32


class RewardModelScore:
    """Scores ``prompt + completion`` with a trained reward model (frozen, on the CPU or its device)."""

    Config = RewardModelScoreConfig

    def __init__(self, config: RewardModelScoreConfig):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.path)
        self.model = AutoModelForSequenceClassification.from_pretrained(config.path).eval().requires_grad_(False)
        if self.model.config.num_labels != 1:
            raise ValueError(f"{config.path}: a reward model has one score (num_labels 1), not {self.model.config.num_labels}")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> torch.Tensor:
        texts = [p + c for p, c in zip(prompts, completions)]
        scores = []
        for i in range(0, len(texts), self.config.batch_size):
            enc = self.tokenizer(texts[i : i + self.config.batch_size], return_tensors="pt", padding=True)
            scores.append(self.model(**enc).logits[:, 0].float())
        return torch.cat(scores)
