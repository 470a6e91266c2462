"""Offline preference optimization: preference-pair data, the DPO family, SimPO and reward models.

Components:

* data ``preference``: prompt / chosen / rejected rows (text or chat), see ``aligntk_po.data``.
* loss ``dpo``: DPO, cDPO, IPO, SLiC (hinge) and robust DPO against a frozen reference.
* loss ``simpo``: reference-free SimPO.
* loss ``reward_model``: Bradley–Terry on a sequence-classification head.

The tensor math lives in ``aligntk_po.losses`` as pure functions.
"""

from __future__ import annotations

from aligntk import Register, hookimpl

from .data import PreferenceData
from .loss import DPOLoss, RewardModelLoss, SimPOLoss

__all__ = ["DPOLoss", "PreferenceData", "RewardModelLoss", "SimPOLoss"]


@hookimpl
def aligntk_register_data(register: Register) -> None:
    register("preference", PreferenceData)


@hookimpl
def aligntk_register_losses(register: Register) -> None:
    register("dpo", DPOLoss)
    register("simpo", SimPOLoss)
    register("reward_model", RewardModelLoss)
