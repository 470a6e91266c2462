"""Online DPO: the policy samples two completions per prompt, a reward ranks them, DPO trains on the pair.

Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback",
https://arxiv.org/abs/2402.04792; TRL 1.16's ``trl.experimental.online_dpo``.

Two registered pieces, as best-of-N: the rollout data with ``advantage: pairwise``
(``aligntk_rl.pairwise``) marks each prompt's chosen (``+1``) and rejected (``-1``)
completion, and the loss ``online_dpo`` is DPO on those pairs, from completion log-probs
summed over tokens (never averaged): the policy's now, the reference's at sampling time
(``ref_logps``, as ``grpo`` reads them). The lines are TRL's
``OnlineDPOTrainer.training_step``::

    logits = (chosen_logps - rejected_logps) - (chosen_ref_logps - rejected_ref_logps)
    sigmoid: -logsigmoid(beta * logits)      ipo: (logits - 1 / (2 * beta)) ** 2

TRL takes the mean over pairs; here the loss returns the sum over pairs and their count,
and the engine divides by the count over the whole global batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from aligntk import (
    IGNORE_INDEX,
    Batch,
    ChunkSize,
    ComponentConfig,
    LossOutput,
    Models,
    TrainingError,
    token_logps,
)

OnlineDPOType = Literal["sigmoid", "ipo"]


def online_dpo_losses(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: OnlineDPOType = "sigmoid",
) -> torch.Tensor:
    """TRL's online DPO loss per pair, from summed completion log-probs ``[P]`` each.

    Returns:
        ``[P]``: ``-logsigmoid(beta * h)`` (``sigmoid``) or ``(h - 1 / (2 beta))^2``
        (``ipo``), with ``h`` the policy's log-ratio margin minus the reference's.
    """
    logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r}; choose sigmoid or ipo")


def pair_indices(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen [P], rejected [P])`` row indices of the pairs the ``pairwise`` selection marked.

    The rollout data keeps each prompt's group together in a micro-batch, in order, with
    one chosen and one rejected row per paired group, so the ``k``-th chosen row pairs
    with the ``k``-th rejected row.
    """
    completion = batch["labels"] != IGNORE_INDEX
    adv = batch["advantages"]
    signs = adv[completion]
    if not bool(((signs == 0) | (signs == 1) | (signs == -1)).all()):
        raise TrainingError(
            "loss online_dpo trains on the chosen and rejected samples a pairwise selection marks; set the "
            "data's advantage to pairwise (data.advantage: pairwise, with data.num_generations: 2)"
        )
    row_sign = (adv * completion).sum(dim=1).sign()
    chosen = torch.nonzero(row_sign > 0).squeeze(1)
    rejected = torch.nonzero(row_sign < 0).squeeze(1)
    if chosen.numel() != rejected.numel():
        raise TrainingError(
            f"loss online_dpo: the micro-batch has {chosen.numel()} chosen and {rejected.numel()} rejected "
            "samples; each pair must stay in one micro-batch (the rollout data keeps a prompt's group together)"
        )
    return chosen, rejected


class OnlineDPOConfig(ComponentConfig):
    """Options of the ``online_dpo`` loss (defaults: TRL 1.16's ``OnlineDPOConfig``).

    Attributes:
        beta: the DPO temperature (``sigmoid``) or IPO's regularization ``tau`` (TRL ``0.1``).
        loss_type: ``sigmoid`` (DPO) or ``ipo``, both on summed log-probs, as TRL's.
        chunk_size: completion tokens per output-layer chunk (``0``: full logits), as ``sft``'s.
    """

    beta: float = Field(0.1, gt=0)
    loss_type: OnlineDPOType = "sigmoid"
    chunk_size: ChunkSize = "auto"


class OnlineDPOLoss:
    """DPO (or IPO) on each prompt's chosen and rejected sample; the engine divides by the pair count."""

    Config = OnlineDPOConfig
    requires = frozenset({"input_ids", "attention_mask", "labels", "ref_logps", "advantages", "rewards"})
    roles = ("policy", "reference")

    def __init__(self, config: OnlineDPOConfig):
        self.config = config

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(pair_indices(batch)[0].numel(), device=batch["labels"].device)

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        c = self.config
        chosen, rejected = pair_indices(batch)
        completion = batch["labels"] != IGNORE_INDEX
        in_pair = torch.zeros(completion.size(0), dtype=torch.bool, device=completion.device)
        in_pair[chosen] = True
        in_pair[rejected] = True
        # the output layer runs only on the tokens of paired samples
        labels = batch["labels"].masked_fill(~in_pair[:, None], IGNORE_INDEX)
        out = token_logps(
            models.policy, batch["input_ids"], batch["attention_mask"], labels=labels, chunk_size=c.chunk_size
        )
        mask = completion.to(out.logps.dtype)
        logps = (out.logps * mask).sum(dim=1)
        ref = (batch["ref_logps"].to(out.logps.dtype) * mask).sum(dim=1)
        losses = online_dpo_losses(logps[chosen], logps[rejected], ref[chosen], ref[rejected], c.beta, c.loss_type)
        loss_sum = losses.sum()

        n_pairs = torch.tensor(float(chosen.numel()), device=loss_sum.device)
        n_seqs = torch.tensor(float(completion.size(0)), device=loss_sum.device)
        rewards = batch["rewards"].float().to(loss_sum.device)
        implicit = (c.beta * (logps - ref)).detach()  # TRL's rewards/chosen and rewards/rejected
        metrics = {
            "reward": (rewards.sum(), n_seqs),
            "scores_margin": ((rewards[chosen] - rewards[rejected]).sum(), n_pairs),
            "pair_fraction": (2 * n_pairs, n_seqs),
            "rewards/chosen": (implicit[chosen].sum(), n_pairs),
            "rewards/rejected": (implicit[rejected].sum(), n_pairs),
            "rewards/margin": ((implicit[chosen] - implicit[rejected]).sum(), n_pairs),
            "rewards/accuracy": ((implicit[chosen] > implicit[rejected]).float().sum(), n_pairs),
            "logps/chosen": (logps[chosen].detach().sum(), n_pairs),
            "logps/rejected": (logps[rejected].detach().sum(), n_pairs),
            "kl": ((logps - ref).detach()[in_pair].sum(), 2 * n_pairs),  # TRL's objective/kl: summed per sample
            "completion_length": (completion.sum().float(), n_seqs),
            **{k: (v.float().sum(), n_seqs) for k, v in batch.items() if k.startswith("reward/")},
        }
        return LossOutput(sum=loss_sum, count=n_pairs.long(), metrics=metrics)
