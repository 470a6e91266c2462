"""Preference loss components: ``dpo`` (and its variants), ``simpo`` and ``reward_model``.

Each one counts preference pairs: ``sum`` is the per-pair loss summed over the pairs of a
micro-batch, ``count`` the number of pairs, and every metric is summed over pairs (the
engine reports ``metric / pairs``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from aligntk import Batch, ChunkSize, ComponentConfig, LossCapabilities, LossOutput, Models, token_logps

from .losses import (
    LossType,
    bradley_terry_loss,
    implicit_rewards,
    label_counts,
    preference_loss,
    simpo_loss,
)

#: The batch fields a causal-LM preference loss reads (the ``preference`` data provides them).
PAIR_FIELDS = frozenset(
    {
        "chosen_input_ids",
        "chosen_attention_mask",
        "chosen_labels",
        "rejected_input_ids",
        "rejected_attention_mask",
        "rejected_labels",
    }
)


def _pairs(batch: Batch) -> torch.Tensor:
    return torch.tensor(batch["chosen_input_ids"].shape[0], device=batch["chosen_input_ids"].device)


def _concatenated(batch: Batch, with_labels: bool = True) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, ``[2B, T]``: one forward pass for both halves.

    The data pads chosen and rejected to one common width, so they concatenate as they are.
    """
    names = ("input_ids", "attention_mask", "labels") if with_labels else ("input_ids", "attention_mask")
    return {n: torch.cat([batch[f"chosen_{n}"], batch[f"rejected_{n}"]], dim=0) for n in names}


def _pair_logps(
    model: torch.nn.Module, joined: dict[str, torch.Tensor], chunk_size: int | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B]`` summed log-probs of the chosen and of the rejected completions under ``model``.

    A chunk size above 0 applies the output layer chunk by chunk over the labelled tokens
    (``aligntk.token_logps``); ``0`` computes the full ``[2B, T, V]`` logits.
    """
    logps = token_logps(
        model, joined["input_ids"], joined["attention_mask"], labels=joined["labels"], chunk_size=chunk_size
    ).logps.sum(-1)
    chosen, rejected = logps.chunk(2, dim=0)
    return chosen, rejected


class ChunkedConfig(ComponentConfig):
    """The option every causal-LM preference loss shares.

    Attributes:
        chunk_size: apply the output layer to this many labelled tokens at a time
            (``aligntk.token_logps``), so full ``[2B, T, V]`` float32 logits never exist;
            ``0`` computes the full logits (the plain path); ``auto`` chunks by 1024 from
            a 16k vocabulary up (``resolve_chunk_size``).
    """

    chunk_size: ChunkSize = "auto"


# --------------------------------------------------------------------------------------
# DPO family
# --------------------------------------------------------------------------------------


class DPOConfig(ChunkedConfig):
    """Options of the ``dpo`` loss.

    Attributes:
        beta: the KL coefficient (IPO's ``τ``); larger stays closer to the reference.
        loss_type: ``sigmoid`` (DPO; cDPO with label_smoothing > 0), ``ipo``, ``hinge``
            (SLiC) or ``robust`` (rDPO); see ``aligntk_po.losses.preference_loss``.
        label_smoothing: the assumed rate of flipped preference labels (``sigmoid``, ``robust``).
        nll_weight: weight of an NLL term on the chosen completion added to each pair's loss:
            the *mean* token NLL of that pair's chosen completion, so that the term is per pair
            like the preference loss, and long completions do not dominate it (RPO,
            Pang et al. 2024, https://arxiv.org/abs/2404.19733, normalizes the same way).
        reference: ``cached`` computes the reference log-probabilities once per example
            before training (the engine keeps them in the run folder's ``cache/``);
            ``live`` runs the reference model in every step.
        chunk_size: see ``ChunkedConfig``.
    """

    beta: float = Field(0.1, gt=0)
    loss_type: LossType = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    nll_weight: float = Field(0.0, ge=0.0)
    reference: Literal["cached", "live"] = "cached"

    @model_validator(mode="after")
    def _robust_smoothing(self) -> DPOConfig:
        if self.loss_type == "robust" and self.label_smoothing >= 0.5:
            raise ValueError("the robust loss needs label_smoothing < 0.5")
        return self


class DPOLoss:
    """Direct preference optimization against a frozen reference (live reference log-probs)."""

    Config = DPOConfig
    requires = PAIR_FIELDS
    roles = ("policy", "reference")

    @classmethod
    def capabilities(cls, config: DPOConfig) -> LossCapabilities:
        # A cached reference is computed once per example; the engine then frees the model.
        cached = config.reference == "cached"
        return LossCapabilities(precompute=cached, live_roles=("policy",) if cached else None)

    def __init__(self, config: DPOConfig):
        self.config = config

    def precompute(self, models: Models, batch: Batch) -> dict[str, torch.Tensor]:
        return self.reference_logps(models, batch)

    def reference_logps(self, models: Models, batch: Batch) -> dict[str, torch.Tensor]:
        """``[B]`` reference log-probabilities of chosen and rejected, for the engine's cache."""
        chosen, rejected = _pair_logps(models["reference"], _concatenated(batch), self.config.chunk_size)
        return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    def count(self, batch: Batch) -> torch.Tensor:
        return _pairs(batch)

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        c = self.config
        joined = _concatenated(batch)
        policy_chosen, policy_rejected = _pair_logps(models.policy, joined, c.chunk_size)
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = _pair_logps(models["reference"], joined, c.chunk_size)
        chosen_len = label_counts(batch["chosen_labels"])
        rejected_len = label_counts(batch["rejected_labels"])
        losses = preference_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            beta=c.beta,
            loss_type=c.loss_type,
            label_smoothing=c.label_smoothing,
            chosen_lengths=chosen_len,
            rejected_lengths=rejected_len,
        )
        metrics = _reward_metrics(*implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, c.beta))
        metrics["logps/chosen"] = policy_chosen.detach().sum()
        metrics["logps/rejected"] = policy_rejected.detach().sum()
        if c.nll_weight > 0:
            nll = -policy_chosen / chosen_len.clamp(min=1)
            losses = losses + c.nll_weight * nll
            metrics["nll"] = nll.detach().sum()
        return LossOutput(sum=losses.sum(), count=_pairs(batch), metrics=metrics)


def _reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair reward metrics, summed over pairs (``accuracy``: chosen strictly above)."""
    return {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/margin": (chosen - rejected).sum(),
        "rewards/accuracy": (chosen > rejected).float().sum(),
    }


# --------------------------------------------------------------------------------------
# SimPO
# --------------------------------------------------------------------------------------


class SimPOConfig(ChunkedConfig):
    """Options of the ``simpo`` loss (defaults in the range the SimPO paper recommends).

    Attributes:
        beta: the reward scale (the paper uses 2.0 to 2.5).
        gamma: the target reward margin (the paper tunes ``gamma / beta`` in 0.3 to 0.8).
        label_smoothing: the assumed rate of flipped preference labels.
        nll_weight: weight of the chosen completion's mean token NLL (CPO's ``alpha``).
        chunk_size: see ``ChunkedConfig``.
    """

    beta: float = Field(2.0, gt=0)
    gamma: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    nll_weight: float = Field(0.0, ge=0.0)


class SimPOLoss:
    """Reference-free preference optimization on length-normalized log-probs."""

    Config = SimPOConfig
    requires = PAIR_FIELDS
    roles = ("policy",)

    def __init__(self, config: SimPOConfig):
        self.config = config

    def count(self, batch: Batch) -> torch.Tensor:
        return _pairs(batch)

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        c = self.config
        policy_chosen, policy_rejected = _pair_logps(models.policy, _concatenated(batch), c.chunk_size)
        chosen_avg = policy_chosen / label_counts(batch["chosen_labels"]).clamp(min=1)
        rejected_avg = policy_rejected / label_counts(batch["rejected_labels"]).clamp(min=1)
        losses = simpo_loss(chosen_avg, rejected_avg, c.beta, c.gamma, c.label_smoothing)
        metrics = _reward_metrics(c.beta * chosen_avg.detach(), c.beta * rejected_avg.detach())
        if c.nll_weight > 0:
            losses = losses - c.nll_weight * chosen_avg
            metrics["nll"] = -chosen_avg.detach().sum()
        return LossOutput(sum=losses.sum(), count=_pairs(batch), metrics=metrics)


# --------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------


class RewardModelConfig(ComponentConfig):
    """Options of the ``reward_model`` loss.

    Attributes:
        use_margin: subtract the data's per-pair ``margin`` inside the sigmoid (Llama 2).
    """

    use_margin: bool = True


class RewardModelLoss:
    """Bradley–Terry loss on a scalar head (``model.task: sequence_classification``, ``num_labels: 1``)."""

    Config = RewardModelConfig
    requires = frozenset(
        {"chosen_input_ids", "chosen_attention_mask", "rejected_input_ids", "rejected_attention_mask", "margin"}
    )
    roles = ("policy",)

    def __init__(self, config: RewardModelConfig):
        self.config = config

    def count(self, batch: Batch) -> torch.Tensor:
        return _pairs(batch)

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        joined = _concatenated(batch, with_labels=False)
        out = models.policy(input_ids=joined["input_ids"], attention_mask=joined["attention_mask"], use_cache=False)
        if out.logits.dim() != 2 or out.logits.shape[-1] != 1:
            raise ValueError(
                f"the reward_model loss needs one score per sequence, got logits of shape {tuple(out.logits.shape)}; "
                "set model.task: sequence_classification and num_labels: 1 in the model config"
            )
        r_chosen, r_rejected = out.logits.squeeze(-1).float().chunk(2, dim=0)
        margin = batch["margin"] if self.config.use_margin else None
        losses = bradley_terry_loss(r_chosen, r_rejected, margin)
        diff = (r_chosen - r_rejected).detach()
        metrics = {
            "accuracy": (diff > 0).float().sum(),
            "margin": diff.sum(),
            "rewards/chosen": r_chosen.detach().sum(),
            "rewards/rejected": r_rejected.detach().sum(),
        }
        return LossOutput(sum=losses.sum(), count=_pairs(batch), metrics=metrics)
