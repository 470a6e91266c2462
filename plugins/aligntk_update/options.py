"""The options every update step shares: optimizer, schedule, clipping, parameter groups, freezing.

Each update step's ``Config`` subclasses ``UpdateOptions``, so every strategy (full,
L2-SP, LoRA, prompt tuning) gets the same optimizer and schedule code and the same
recipe keys. The defaults are those of the original ``full`` step.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from aligntk import ComponentConfig


class UpdateOptions(ComponentConfig):
    """Options shared by every update step.

    Attributes:
        learning_rate: peak learning rate.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD) for matrices; biases,
            norm weights and other 1-D tensors never get any.
        optimizer: ``adamw`` or ``sgd``.
        betas, eps: AdamW's moments.
        momentum, nesterov: SGD's momentum.
        fused: fused AdamW kernel. ``None`` picks it when every trainable tensor is a
            floating-point CUDA tensor, and the default (foreach) kernel otherwise.
        warmup_steps, warmup_ratio: linear warm-up from 0, in steps or as a fraction of
            the schedule (give one).
        schedule: decay after warm-up: ``constant``, ``linear`` (to 0) or ``cosine`` (to 0).
        schedule_steps: length of the schedule; default ``train.max_steps``.
        max_grad_norm: clip the global gradient norm to this (``null``: no clipping).
        learning_rates: per-group rates: parameter-name pattern -> learning rate. The
            first pattern that matches a parameter's name sets its rate; patterns are
            globs matched anywhere in the name (``prompt_encoder`` matches
            ``peft_model.prompt_encoder.default.embedding.weight``).
        freeze: parameter-name patterns (same matching) to keep fixed.
        freeze_layers: transformer blocks to keep fixed, as a ``start:end`` slice over the
            block indices (``0:6``); a bound may be a percentage of the blocks
            (``:50%`` is the lower half).
    """

    learning_rate: PositiveFloat = 5e-5
    weight_decay: NonNegativeFloat = 0.0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    momentum: NonNegativeFloat = 0.0
    nesterov: bool = False
    fused: bool | None = None
    warmup_steps: NonNegativeInt = 0
    warmup_ratio: NonNegativeFloat = 0.0
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    schedule_steps: PositiveInt | None = None
    max_grad_norm: PositiveFloat | None = 1.0
    learning_rates: dict[str, PositiveFloat] = Field(default_factory=dict)
    freeze: list[str] = Field(default_factory=list)
    freeze_layers: str | None = Field(default=None, pattern=r"^\s*-?\d*%?\s*:\s*-?\d*%?\s*$")

    @model_validator(mode="after")
    def _consistent(self) -> UpdateOptions:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        if self.warmup_ratio >= 1:
            raise ValueError("warmup_ratio must be below 1")
        if self.optimizer == "sgd" and self.fused:
            raise ValueError("fused is an AdamW option; SGD has no fused kernel here")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer: sgd with a momentum above 0")
        return self
