"""Rule-based rewards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from aligntk import ComponentConfig


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
