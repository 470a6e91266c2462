"""Reference-free preference losses with an NLL term: ``cpo`` (CPO, AlphaPO, CPO-SimPO) and ``orpo``.

Both count preference pairs. TRL adds its NLL term as a mean over the chosen *tokens* of the
batch, a different unit from the per-pair preference term; ``nll_reduction: batch`` does the
same (``sum`` carries ``pairs * token-mean NLL``, so the engine's division by the pairs gives
TRL's value exactly) and therefore needs the whole batch in one micro-batch. ``pair`` takes
each pair's mean token NLL instead, which is exact under gradient accumulation and several
processes.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from aligntk import IGNORE_INDEX, Batch, LossCapabilities, LossOutput, Models, token_logps

from .loss import PAIR_FIELDS, ChunkedConfig, _concatenated, _pairs, _reward_metrics
from .losses import CPOLossType, cpo_loss, label_counts, odds_ratio_loss

NllReduction = Literal["batch", "pair"]


def _nll_term(
    token_logps_: torch.Tensor, mask: torch.Tensor, reduction: NllReduction
) -> tuple[torch.Tensor, torch.Tensor]:
    """The NLL term's contribution to a per-pair ``sum``, and its per-pair values for metrics.

    Args:
        token_logps_: ``[B, T]`` per-token log-probs (aligned with the inputs).
        mask: ``[B, T]`` bool, the tokens the NLL covers.
        reduction: ``batch``: ``B * mean over every covered token`` (TRL); ``pair``: the sum of
            each row's mean over its covered tokens.

    Returns:
        ``(sum contribution, [B] per-pair mean token NLL)``.
    """
    nll = -(token_logps_ * mask).sum(-1)
    per_pair = nll / mask.sum(-1).clamp(min=1)
    if reduction == "batch":
        return nll.sum() / mask.sum().clamp(min=1) * mask.shape[0], per_pair
    return per_pair.sum(), per_pair


def _completion_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the positions whose log-prob ``token_logps`` computes for ``labels``."""
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False  # position 0 is never predicted
    return mask


# --------------------------------------------------------------------------------------
# CPO
# --------------------------------------------------------------------------------------


class CPOConfig(ChunkedConfig):
    """Options of the ``cpo`` loss (TRL 1.16 ``CPOConfig``'s defaults).

    Attributes:
        beta: the temperature of the preference term.
        loss_type: ``sigmoid`` (CPO), ``hinge``, ``ipo`` or ``simpo`` (CPO-SimPO); ``ipo`` and
            ``simpo`` take length-averaged log-probs, the others summed ones (as TRL).
        label_smoothing: the assumed rate of flipped labels (``sigmoid``, ``simpo``).
        simpo_gamma: SimPO's target reward margin (``simpo``).
        cpo_alpha: weight of the NLL on the chosen completions (0 turns it off).
        alpha: AlphaPO's reward shape α (0: log-prob rewards).
        nll_reduction: ``batch`` (TRL: mean over the batch's chosen tokens; one micro-batch per
            step) or ``pair`` (each pair's mean token NLL).
        chunk_size: see ``ChunkedConfig``.
    """

    beta: float = Field(0.1, gt=0)
    loss_type: CPOLossType = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    simpo_gamma: float = 0.5
    cpo_alpha: float = Field(1.0, ge=0.0)
    alpha: float = 0.0
    nll_reduction: NllReduction = "batch"


class CPOLoss:
    """Contrastive preference optimization: a reference-free preference term plus the chosen NLL."""

    Config = CPOConfig
    requires = PAIR_FIELDS
    roles = ("policy",)

    @classmethod
    def capabilities(cls, config: CPOConfig) -> LossCapabilities:
        return LossCapabilities(whole_batch=config.nll_reduction == "batch" and config.cpo_alpha > 0)

    def __init__(self, config: CPOConfig):
        self.config = config

    def count(self, batch: Batch) -> torch.Tensor:
        return _pairs(batch)

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        c = self.config
        joined = _concatenated(batch)
        out = token_logps(
            models.policy,
            joined["input_ids"],
            joined["attention_mask"],
            labels=joined["labels"],
            chunk_size=c.chunk_size,
        )
        chosen_tokens, _ = out.logps.chunk(2, dim=0)
        summed = out.logps.sum(-1)
        if c.loss_type in ("ipo", "simpo"):
            summed = summed / label_counts(joined["labels"]).clamp(min=1)
        policy_chosen, policy_rejected = summed.chunk(2, dim=0)
        losses = cpo_loss(
            policy_chosen, policy_rejected, c.beta, c.loss_type, c.label_smoothing, c.simpo_gamma, c.alpha
        )
        total = losses.sum()
        rewards = (policy_chosen.detach(), policy_rejected.detach())
        if c.alpha != 0.0:
            rewards = tuple((1 - torch.exp(r).pow(-c.alpha)) / c.alpha for r in rewards)  # type: ignore[assignment]
        metrics = _reward_metrics(c.beta * rewards[0], c.beta * rewards[1])
        if c.cpo_alpha > 0:
            nll_sum, per_pair = _nll_term(chosen_tokens, _completion_mask(batch["chosen_labels"]), c.nll_reduction)
            total = total + c.cpo_alpha * nll_sum
            metrics["nll"] = per_pair.detach().sum()
        return LossOutput(sum=total, count=_pairs(batch), metrics=metrics)


# --------------------------------------------------------------------------------------
# ORPO
# --------------------------------------------------------------------------------------


class ORPOConfig(ChunkedConfig):
    """Options of the ``orpo`` loss (TRL 1.16 ``ORPOConfig``'s defaults).

    Attributes:
        beta: the weight λ of the odds-ratio term.
        nll_on_prompt: the NLL covers the chosen row's prompt tokens too, as TRL's ORPO does
            ("computed over the full prompt and response"); ``false``: the completion only.
        nll_reduction: ``batch`` (TRL: one mean over the batch's chosen tokens; one
            micro-batch per step) or ``pair`` (each pair's mean token NLL).
        chunk_size: see ``ChunkedConfig``.
    """

    beta: float = Field(0.1, gt=0)
    nll_on_prompt: bool = True
    nll_reduction: NllReduction = "batch"


class ORPOLoss:
    """Odds-ratio preference optimization: the chosen NLL plus a reference-free odds-ratio term."""

    Config = ORPOConfig
    requires = PAIR_FIELDS
    roles = ("policy",)

    @classmethod
    def capabilities(cls, config: ORPOConfig) -> LossCapabilities:
        return LossCapabilities(whole_batch=config.nll_reduction == "batch")

    def __init__(self, config: ORPOConfig):
        self.config = config

    def count(self, batch: Batch) -> torch.Tensor:
        return _pairs(batch)

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        c = self.config
        joined = _concatenated(batch)
        chosen_labels = batch["chosen_labels"]
        if c.nll_on_prompt:
            # One forward: the chosen rows score every real token, the rejected rows their completion.
            full = batch["chosen_input_ids"].masked_fill(batch["chosen_attention_mask"] == 0, IGNORE_INDEX)
            joined = {**joined, "labels": torch.cat([full, batch["rejected_labels"]], dim=0)}
        out = token_logps(
            models.policy,
            joined["input_ids"],
            joined["attention_mask"],
            labels=joined["labels"],
            chunk_size=c.chunk_size,
        )
        chosen_tokens, rejected_tokens = out.logps.chunk(2, dim=0)
        completion = _completion_mask(chosen_labels)
        chosen_avg = (chosen_tokens * completion).sum(-1) / completion.sum(-1).clamp(min=1)
        rejected_avg = rejected_tokens.sum(-1) / label_counts(batch["rejected_labels"]).clamp(min=1)
        losses = odds_ratio_loss(chosen_avg, rejected_avg, c.beta)
        nll_mask = _completion_mask(joined["labels"][: chosen_labels.shape[0]]) if c.nll_on_prompt else completion
        nll_sum, per_pair = _nll_term(chosen_tokens, nll_mask, c.nll_reduction)
        metrics = _reward_metrics(c.beta * chosen_avg.detach(), c.beta * rejected_avg.detach())
        metrics["nll"] = per_pair.detach().sum()
        metrics["odds_ratio_loss"] = losses.detach().sum()
        return LossOutput(sum=losses.sum() + nll_sum, count=_pairs(batch), metrics=metrics)


__all__ = ["CPOLoss", "ORPOLoss"]
