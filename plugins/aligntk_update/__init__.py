"""The default update step: full fine-tuning with AdamW, warm-up and decay, and clipping."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, model_validator
from transformers import get_scheduler

from aligntk import ComponentConfig, hookimpl


class FullFineTuningConfig(ComponentConfig):
    """Every parameter moves; AdamW with a warm-up and a decay schedule."""

    learning_rate: PositiveFloat = 5e-5
    weight_decay: NonNegativeFloat = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    warmup_steps: NonNegativeInt = 0
    warmup_ratio: NonNegativeFloat = 0.0
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    max_grad_norm: PositiveFloat | None = 1.0
    fused: bool | None = None

    @model_validator(mode="after")
    def _one_warmup(self) -> FullFineTuningConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        if self.warmup_ratio >= 1:
            raise ValueError("warmup_ratio must be below 1")
        return self


_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


class FullFineTuning:
    """Trains all parameters. Biases and norm weights (1-D tensors) get no weight decay."""

    Config = FullFineTuningConfig

    def __init__(self, config: FullFineTuningConfig):
        self.config = config
        self.max_grad_norm = config.max_grad_norm

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def configure(
        self, model: torch.nn.Module, total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        c = self.config
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": c.weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=c.learning_rate, betas=c.betas, eps=c.eps, fused=c.fused
        )
        warmup = c.warmup_steps or round(c.warmup_ratio * total_steps)
        scheduler = get_scheduler(
            _SCHEDULES[c.schedule], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
        )
        return optimizer, scheduler

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        return None


@hookimpl
def aligntk_register_update_steps(register):
    register("full", FullFineTuning)
