"""Weak-to-strong loss components: the pure functions of ``losses.py`` on the engine.

The classification losses read a sequence-classification policy
(``models.policy(input_ids=..., attention_mask=...).logits`` ``[N, C]``) and the weak
supervisor's probabilities in the batch field ``soft_labels`` ``[N, C]``; their unit is
one example. ``token_distill`` reads a causal-LM policy and a frozen ``teacher``; its
unit is one output token.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from aligntk import IGNORE_INDEX, Batch, ComponentConfig, LossCapabilities, LossOutput, Models, class_logits

from .losses import aux_alpha, aux_conf_loss, label_ce, product_loss, token_distill

CLASSIFICATION_FIELDS = frozenset({"input_ids", "attention_mask", "soft_labels"})


def _classifier_logits(models: Models, batch: Batch) -> torch.Tensor:
    """The policy's class logits ``[N, C]``, checked against the width of ``soft_labels``."""
    logits = class_logits(models.policy, batch)
    if logits.shape != batch["soft_labels"].shape:
        raise ValueError(
            f"the policy gives logits of shape {tuple(logits.shape)} but soft_labels have shape "
            f"{tuple(batch['soft_labels'].shape)}; set the model's num_labels to the number of classes"
        )
    return logits


def _accuracy_sum(logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """How many examples the policy's argmax agrees with the weak label on (a metric, no gradient)."""
    return (logits.detach().argmax(-1) == soft_labels.argmax(-1)).sum().float()


class _ExampleCount:
    """Classification losses count examples."""

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["input_ids"].shape[0])


class W2SCEConfig(ComponentConfig):
    """Options of ``w2s_ce``."""

    hard: bool = False
    """Train on the argmax of the weak labels instead of their probabilities."""


class W2SCE(_ExampleCount):
    """Cross-entropy on the weak supervisor's labels (soft, or hardened with ``hard``)."""

    Config = W2SCEConfig
    requires = CLASSIFICATION_FIELDS
    roles = ("policy",)

    def __init__(self, config: W2SCEConfig):
        self.config = config

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        logits = _classifier_logits(models, batch)
        losses = label_ce(logits, batch["soft_labels"], hard=self.config.hard)
        return LossOutput(
            sum=losses.sum(),
            count=self.count(batch),
            metrics={"agree_weak": _accuracy_sum(logits, batch["soft_labels"])},
        )


class W2SAuxConfConfig(ComponentConfig):
    """Options of ``w2s_aux_conf``."""

    alpha_max: float = Field(0.5, ge=0, le=1)
    """Weight on the student's hardened labels after warm-up."""
    warmup_frac: float = Field(0.2, ge=0, le=1)
    """Fraction of training over which the weight ramps linearly from 0."""


class W2SAuxConf(_ExampleCount):
    """Auxiliary-confidence loss (Burns et al. 2023), with the weight ramped by ``start_step``.

    The hardening threshold is set per micro-batch (the class prior of its weak labels),
    so this loss depends on how the global batch is split. It declares ``whole_batch``
    the engine refuses to run it with more than one micro-batch per optimizer step.
    """

    Config = W2SAuxConfConfig
    requires = CLASSIFICATION_FIELDS
    roles = ("policy",)

    @classmethod
    def capabilities(cls, config: W2SAuxConfConfig) -> LossCapabilities:
        # The class-prior threshold is a statistic of the whole batch, as in the paper.
        return LossCapabilities(whole_batch=True, scheduled=True)

    def __init__(self, config: W2SAuxConfConfig):
        self.config = config
        self.alpha = 0.0

    def start_step(self, step: int, max_steps: int) -> None:
        self.alpha = aux_alpha(step, max_steps, self.config.alpha_max, self.config.warmup_frac)

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        logits = _classifier_logits(models, batch)
        losses = aux_conf_loss(logits, batch["soft_labels"], self.alpha)
        n = self.count(batch)
        return LossOutput(
            sum=losses.sum(),
            count=n,
            # Summed over examples like every metric, so the engine's average is alpha itself.
            metrics={
                "aux_alpha": torch.tensor(self.alpha) * n,
                "agree_weak": _accuracy_sum(logits, batch["soft_labels"]),
            },
        )


class W2SProductConfig(ComponentConfig):
    """Options of ``w2s_product``."""

    alpha: float = Field(1.0, ge=0)
    """Exponent on the weak labels."""
    beta: float = Field(1.0, ge=0)
    """Exponent on the student's probabilities."""


class W2SProduct(_ExampleCount):
    """Product loss (Burns et al. 2023): cross-entropy on ``p_student^beta * weak^alpha``, renormalized."""

    Config = W2SProductConfig
    requires = CLASSIFICATION_FIELDS
    roles = ("policy",)

    def __init__(self, config: W2SProductConfig):
        self.config = config

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        logits = _classifier_logits(models, batch)
        losses = product_loss(logits, batch["soft_labels"], self.config.alpha, self.config.beta)
        return LossOutput(
            sum=losses.sum(),
            count=self.count(batch),
            metrics={"agree_weak": _accuracy_sum(logits, batch["soft_labels"])},
        )


class TokenDistillConfig(ComponentConfig):
    """Options of ``token_distill``."""

    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """``forward_kl`` KL(teacher||student), ``reverse_kl`` KL(student||teacher), or ``jsd``."""
    beta: float = Field(0.5, gt=0, lt=1)
    """JSD interpolation weight, TRL GKD convention (only read for ``jsd``)."""
    temperature: float = Field(1.0, gt=0)


class TokenDistill:
    """Token-level distillation from a frozen teacher LM over the output tokens.

    Teacher logits are computed live on each micro-batch; teacher and policy must share
    a vocabulary.
    """

    Config = TokenDistillConfig
    requires = frozenset({"input_ids", "attention_mask", "labels"})
    roles = ("policy", "teacher")

    def __init__(self, config: TokenDistillConfig):
        self.config = config

    def count(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        with torch.no_grad():
            teacher_logits = models["teacher"](**inputs).logits
        student_logits = models.policy(**inputs).logits
        if teacher_logits.shape[-1] != student_logits.shape[-1]:
            raise ValueError(
                f"teacher vocabulary {teacher_logits.shape[-1]} != policy vocabulary {student_logits.shape[-1]}"
            )
        loss_sum, count = token_distill(
            student_logits, teacher_logits, batch["labels"], self.config.kind, self.config.beta, self.config.temperature
        )
        return LossOutput(sum=loss_sum, count=count)
