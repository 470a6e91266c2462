"""Offline preference optimization: preference data, the DPO family, CPO, ORPO, KTO, BCO, SimPO, reward models.

Components:

* data ``preference``: prompt / chosen / rejected rows (text or chat), see ``aligntk_po.data``.
* data ``unpaired_preference``: prompt / completion / label rows with KTO's mismatched pairs,
  see ``aligntk_po.unpaired``.
* loss ``dpo``: DPO and every TRL 1.16 ``DPOTrainer`` loss type (cDPO, IPO, SLiC, robust,
  EXO, NCA, BCO-pair, SPPO, AOT, APO, DiscoPOP, sigmoid_norm, sft) with f-divergences; MPO is
  several ``dpo`` entries with weights in the recipe's loss list.
* loss ``simpo``: reference-free SimPO.
* losses ``cpo`` (CPO, AlphaPO, CPO-SimPO) and ``orpo``: reference-free, with an NLL term
  (``aligntk_po.cpo``).
* losses ``kto`` and ``bco``: unpaired data (``aligntk_po.kto``).
* loss ``reward_model``: Bradley–Terry on a sequence-classification head.

The tensor math lives in ``aligntk_po.losses`` and ``aligntk_po.kto`` as pure functions.
docs/methods.md lists each method with its paper, TRL counterpart, recipe and parity test.
"""

from __future__ import annotations

from aligntk import Register, hookimpl

from .cpo import CPOLoss, ORPOLoss
from .data import PreferenceData
from .kto import BCOLoss, KTOLoss
from .loss import DPOLoss, RewardModelLoss, SimPOLoss
from .unpaired import UnpairedPreferenceData

__all__ = [
    "BCOLoss",
    "CPOLoss",
    "DPOLoss",
    "KTOLoss",
    "ORPOLoss",
    "PreferenceData",
    "RewardModelLoss",
    "SimPOLoss",
    "UnpairedPreferenceData",
]


@hookimpl
def aligntk_register_data(register: Register) -> None:
    register("preference", PreferenceData)
    register("unpaired_preference", UnpairedPreferenceData)


@hookimpl
def aligntk_register_losses(register: Register) -> None:
    register("dpo", DPOLoss)
    register("simpo", SimPOLoss)
    register("cpo", CPOLoss)
    register("orpo", ORPOLoss)
    register("kto", KTOLoss)
    register("bco", BCOLoss)
    register("reward_model", RewardModelLoss)
