"""Weak-to-strong generalization (Burns et al. 2023, https://arxiv.org/abs/2312.09390).

A strong model is fine-tuned on a weaker supervisor's labels. Losses: ``w2s_ce`` (soft or
hard labels), ``w2s_aux_conf`` (auxiliary confidence), ``w2s_product`` (product of
experts) for classification, and ``token_distill`` (forward/reverse KL, generalized JSD)
for generation.

Also: the ``classification`` data component (scored by the eval plugin's ``accuracy``
evaluator), one-pass teacher labelling (``label_examples``), the PGR metric
(``aligntk_w2s.metrics``) and the ``aligntk w2s RECIPE`` protocol command.
"""

from __future__ import annotations

from typing import Any

from aligntk import Register, hookimpl

from .data import ClassificationData
from .labelling import label_examples, write_labels
from .loss import TokenDistill, W2SAuxConf, W2SCE, W2SProduct

__all__ = [
    "ClassificationData",
    "TokenDistill",
    "W2SAuxConf",
    "W2SCE",
    "W2SProduct",
    "label_examples",
    "write_labels",
]


@hookimpl
def aligntk_register_losses(register: Register) -> None:
    register("w2s_ce", W2SCE)
    register("w2s_aux_conf", W2SAuxConf)
    register("w2s_product", W2SProduct)
    register("token_distill", TokenDistill)


@hookimpl
def aligntk_register_data(register: Register) -> None:
    register("classification", ClassificationData)


@hookimpl
def aligntk_register_commands(cli: Any) -> None:
    from .command import w2s

    cli.add_command(w2s)
