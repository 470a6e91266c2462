"""Weak-to-strong generalization (Burns et al. 2023, https://arxiv.org/abs/2312.09390).

A strong model is fine-tuned on a weaker supervisor's labels. Losses: ``w2s_ce`` (soft or
hard labels), ``w2s_aux_conf`` (auxiliary confidence), ``w2s_product`` (product of
experts) for classification, and ``token_distill`` (forward/reverse KL, generalized JSD)
for generation.
"""

from __future__ import annotations

from aligntk import hookimpl
from aligntk.hookspecs import Register

from .loss import TokenDistill, W2SAuxConf, W2SCE, W2SProduct

__all__ = ["TokenDistill", "W2SAuxConf", "W2SCE", "W2SProduct"]


@hookimpl
def aligntk_register_losses(register: Register) -> None:
    register("w2s_ce", W2SCE)
    register("w2s_aux_conf", W2SAuxConf)
    register("w2s_product", W2SProduct)
    register("token_distill", TokenDistill)
