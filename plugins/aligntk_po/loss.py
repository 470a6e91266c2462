"""Preference loss components: ``dpo`` (and its variants), ``simpo`` and ``reward_model``.

(``cpo`` and ``orpo`` are in ``aligntk_po.cpo``; the unpaired ``kto`` and ``bco`` in ``aligntk_po.kto``.)

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
    BATCH_LOSS_TYPES,
    DIVERGENCE_LOSS_TYPES,
    FDivergence,
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
    """Options of the ``dpo`` loss (TRL 1.16 ``DPOConfig``'s defaults).

    Attributes:
        beta: the KL coefficient (IPO's ``τ``); larger stays closer to the reference.
        loss_type: one of ``aligntk_po.losses.LOSS_TYPES`` (see ``preference_loss``): ``sigmoid``
            (DPO; cDPO with label_smoothing > 0), ``ipo``, ``hinge`` (SLiC), ``robust`` (rDPO),
            ``exo_pair``, ``nca_pair``, ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``,
            ``apo_zero``, ``apo_down``, ``discopop``, ``sigmoid_norm``, or ``sft``: the chosen
            completions' NLL, a mean over their tokens (it counts tokens, not pairs). Several
            types with weights (TRL's ``loss_type`` list with ``loss_weights``, MPO) are several
            entries of the recipe's ``loss`` list.
        label_smoothing: ``eps``: the assumed rate of flipped labels (``sigmoid``, ``robust``,
            ``aot``, ``aot_unpaired``); EXO's ``ε`` (``exo_pair`` needs it above 0).
        f_divergence_type: the f-divergence of f-DPO (``reverse_kl``: plain DPO, ``forward_kl``,
            ``js_divergence``, ``alpha_divergence``); other than ``reverse_kl`` only with the
            types in ``DIVERGENCE_LOSS_TYPES``, as in TRL.
        f_alpha_divergence_coef: the α of ``alpha_divergence``.
        discopop_tau: DiscoPOP's temperature τ.
        nll_weight: weight of an NLL term on the chosen completion added to each pair's loss:
            the *mean* token NLL of that pair's chosen completion, so that the term is per pair
            like the preference loss, and long completions do not dominate it (RPO,
            Pang et al. 2024, https://arxiv.org/abs/2404.19733, normalizes the same way).
        reference: ``cached`` computes the reference log-probabilities once per example
            before training (the engine keeps them in the run folder's ``cache/``);
            ``live`` runs the reference model in every step. ``sft`` calls no reference.
        chunk_size: see ``ChunkedConfig``.
    """

    beta: float = Field(0.1, gt=0)
    loss_type: LossType = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    f_divergence_type: FDivergence = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = Field(0.05, gt=0)
    nll_weight: float = Field(0.0, ge=0.0)
    reference: Literal["cached", "live"] = "cached"

    @model_validator(mode="after")
    def _check_combination(self) -> DPOConfig:
        if self.loss_type == "robust" and self.label_smoothing >= 0.5:
            raise ValueError("the robust loss needs label_smoothing < 0.5")
        if self.loss_type == "exo_pair" and self.label_smoothing == 0.0:
            raise ValueError("the exo_pair loss needs label_smoothing > 0 (the EXO paper uses 1e-3)")
        if self.f_divergence_type != "reverse_kl" and self.loss_type not in DIVERGENCE_LOSS_TYPES:
            raise ValueError(
                f"f_divergence_type {self.f_divergence_type!r} works only with loss_type "
                f"{', '.join(sorted(DIVERGENCE_LOSS_TYPES))}; got {self.loss_type!r}"
            )
        if self.loss_type == "sft" and self.nll_weight > 0:
            raise ValueError("loss_type 'sft' is the chosen NLL already; leave nll_weight at 0")
        return self


class DPOLoss:
    """Direct preference optimization against a frozen reference, and its TRL variants."""

    Config = DPOConfig
    requires = PAIR_FIELDS
    roles = ("policy", "reference")

    @classmethod
    def capabilities(cls, config: DPOConfig) -> LossCapabilities:
        # A cached reference is computed once per example; the engine then frees the model.
        # AOT sorts the batch, so its micro-batch must be the whole batch.
        whole = config.loss_type in BATCH_LOSS_TYPES
        if config.loss_type == "sft":
            return LossCapabilities(live_roles=("policy",))
        cached = config.reference == "cached"
        return LossCapabilities(precompute=cached, live_roles=("policy",) if cached else None, whole_batch=whole)

    def __init__(self, config: DPOConfig):
        self.config = config
        # Cached fields are named per loss type, so a recipe can list several types (MPO); the
        # engine refuses two losses precomputing the same field names.
        suffix = "" if config.loss_type == "sigmoid" else f".{config.loss_type}"
        self.ref_keys = (f"ref_chosen_logps{suffix}", f"ref_rejected_logps{suffix}")

    def precompute(self, models: Models, batch: Batch) -> dict[str, torch.Tensor]:
        return self.reference_logps(models, batch)

    def reference_logps(self, models: Models, batch: Batch) -> dict[str, torch.Tensor]:
        """``[B]`` reference log-probabilities of chosen and rejected, for the engine's cache."""
        chosen, rejected = _pair_logps(models["reference"], _concatenated(batch), self.config.chunk_size)
        return {self.ref_keys[0]: chosen, self.ref_keys[1]: rejected}

    def count(self, batch: Batch) -> torch.Tensor:
        if self.config.loss_type == "sft":
            return label_counts(batch["chosen_labels"]).sum()
        return _pairs(batch)

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        c = self.config
        if c.loss_type == "sft":
            return self._sft(models, batch)
        joined = _concatenated(batch)
        policy_chosen, policy_rejected = _pair_logps(models.policy, joined, c.chunk_size)
        if self.ref_keys[0] in batch:
            ref_chosen, ref_rejected = batch[self.ref_keys[0]], batch[self.ref_keys[1]]
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
            f_divergence=c.f_divergence_type,
            f_alpha=c.f_alpha_divergence_coef,
            discopop_tau=c.discopop_tau,
        )
        metrics = _reward_metrics(*implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, c.beta))
        metrics["logps/chosen"] = policy_chosen.detach().sum()
        metrics["logps/rejected"] = policy_rejected.detach().sum()
        if c.nll_weight > 0:
            nll = -policy_chosen / chosen_len.clamp(min=1)
            losses = losses + c.nll_weight * nll
            metrics["nll"] = nll.detach().sum()
        return LossOutput(sum=losses.sum(), count=_pairs(batch), metrics=metrics)

    def _sft(self, models: Models, batch: Batch) -> LossOutput:
        """TRL's ``sft`` type: ``-mean`` of the chosen completions' token log-probs (the unit is a token)."""
        out = token_logps(
            models.policy,
            batch["chosen_input_ids"],
            batch["chosen_attention_mask"],
            labels=batch["chosen_labels"],
            chunk_size=self.config.chunk_size,
        )
        nll = -out.logps.sum()
        return LossOutput(sum=nll, count=self.count(batch), metrics={"nll": nll.detach()})


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
