"""Weak-to-strong generalization (Burns et al. 2023, https://arxiv.org/abs/2312.09390).

A strong model is fine-tuned on a weaker supervisor's labels. Losses: ``w2s_ce`` (soft or
hard labels), ``w2s_aux_conf`` (auxiliary confidence), ``w2s_product`` (product of
experts) for classification, and ``token_distill`` (forward/reverse KL, generalized JSD)
for generation.

Also: the ``classification`` data component, the ``accuracy`` evaluator, one-pass
teacher labelling (``label_examples``) and the ``aligntk w2s RECIPE`` protocol command.
"""

from __future__ import annotations

from typing import Any

from aligntk import hookimpl
from aligntk.hookspecs import Register

from .data import ClassificationData
from .labelling import Accuracy, label_examples, write_labels
from .loss import TokenDistill, W2SAuxConf, W2SCE, W2SProduct

__all__ = [
    "Accuracy",
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
def aligntk_register_evaluators(register: Register) -> None:
    register("accuracy", Accuracy)


@hookimpl
def aligntk_register_commands(cli: Any) -> None:
    from .command import w2s

    cli.add_command(w2s)
