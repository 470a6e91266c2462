"""Supervised fine-tuning: prompt/completion or chat data, and the output-token loss."""

from __future__ import annotations

from aligntk import hookimpl

from .data import SFTData
from .loss import SFTLoss, token_nll

__all__ = ["SFTData", "SFTLoss", "token_nll"]


@hookimpl
def aligntk_register_data(register):
    register("sft", SFTData)


@hookimpl
def aligntk_register_losses(register):
    register("sft", SFTLoss)
