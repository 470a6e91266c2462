"""The update-step skeleton every strategy shares, full fine-tuning, and the anchored (L2-SP) step."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import PositiveFloat

from aligntk import AligntkError

from .freeze import apply_freeze, log_trainable
from .optim import build_optimizer, build_scheduler
from .options import UpdateOptions


def _is_peft_model(model: torch.nn.Module) -> bool:
    """A ``peft.PeftModel``: what ``model.adapter: continue`` loads from an adapter folder."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


class UpdateBase:
    """``prepare`` = ``wrap`` then freeze; ``configure`` = shared optimizer and schedule; no penalty.

    A strategy overrides ``wrap`` (adapters) and, for a regularizer, ``penalty``.
    """

    Config: ClassVar[type[UpdateOptions]] = UpdateOptions
    strategy: ClassVar[str] = "full"

    def __init__(self, config: UpdateOptions):
        self.config = config
        self.max_grad_norm = config.max_grad_norm

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    #: Whether ``wrap`` goes on training an adapter the model was loaded with (``model.adapter: continue``).
    continues_adapter: ClassVar[bool] = False

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        if _is_peft_model(model) and not self.continues_adapter:
            raise AligntkError(
                f"model.adapter: continue: update {self.strategy} cannot go on training a loaded adapter; "
                "use update: {name: lora} to train it further, or model.adapter: merge to fold it into the "
                f"weights and train those with {self.strategy}"
            )
        model = self.wrap(model)
        apply_freeze(model, self.config.freeze, self.config.freeze_layers)
        log_trainable(model, self.strategy)
        return model

    def configure(
        self, model: torch.nn.Module, total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        if not any(p.requires_grad for p in model.parameters()):
            raise AligntkError(
                f"update {self.strategy}: no parameter is trainable; update.freeze / update.freeze_layers "
                "froze everything the strategy leaves trainable"
            )
        optimizer = build_optimizer(model, self.config)
        return optimizer, build_scheduler(optimizer, self.config, total_steps)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        return None


class FullFineTuning(UpdateBase):
    """Trains every parameter not frozen by ``freeze`` / ``freeze_layers`` (the default step)."""


class L2SPConfig(UpdateOptions):
    """Options of ``l2sp``: the shared options plus ``alpha``, the anchor's weight."""

    alpha: PositiveFloat = 0.01


class L2SP(UpdateBase):
    """Full fine-tuning anchored to the starting weights (L2-SP, Li et al. 2018, arXiv:1802.01483).

    Adds ``alpha / 2 * sum ||theta - theta_0||^2`` over the trainable parameters to each
    step's loss, so its gradient is ``alpha * (theta - theta_0)``: weight decay towards
    the pre-trained weights instead of towards zero. The engine adds it once per
    optimizer step. ``theta_0`` is a copy of the weights as ``prepare`` leaves them.
    """

    Config = L2SPConfig
    strategy = "l2sp"

    def __init__(self, config: L2SPConfig):
        super().__init__(config)
        self.alpha = config.alpha
        self.anchors: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model = super().prepare(model)
        self.anchors = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
        return model

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        if not self.anchors:
            return None
        first = self.anchors[0][0]
        if self.anchors[0][1].device != first.device:  # the engine moved the model after prepare
            self.anchors = [(p, p0.to(p.device)) for p, p0 in self.anchors]
        # float32 sum, whatever the weights' dtype: the distances are small differences.
        total = torch.zeros((), device=first.device, dtype=torch.float32)
        for p, p0 in self.anchors:
            total = total + (p.float() - p0.float()).pow(2).sum()
        return 0.5 * self.alpha * total
