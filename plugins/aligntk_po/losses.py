"""Offline preference-optimization losses as pure tensor functions (float32 math).

Every function returns one value per preference pair (``[B]``); the loss components sum
them and let the engine divide by the number of pairs over the global batch.

Conventions follow TRL 1.16 so that results are comparable:

* ``sequence_logps`` shifts by one (position ``t`` predicts label ``t + 1``) and sums the
  log-probabilities of the labelled tokens (label ``-100`` is ignored).
* IPO divides each log-ratio by the number of completion tokens before taking the squared
  loss (TRL ``DPOTrainer``, loss_type ``ipo``; confirmed there with the IPO authors).
* SimPO takes length-averaged log-probabilities (TRL ``CPOTrainer``, loss_type ``simpo``).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

from aligntk import IGNORE_INDEX, logps_from_logits

LossType = Literal["sigmoid", "ipo", "hinge", "robust"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each sequence's labelled tokens (the plain path, ``aligntk.logps_from_logits``).

    Logits are upcast to float32 before the log-softmax.

    Args:
        logits: ``[B, T, V]`` model outputs.
        labels: ``[B, T]`` target ids aligned with the inputs, ``-100`` where no loss is taken.

    Returns:
        ``[B]`` float32: ``sum_t log p(labels[t + 1] | inputs[:t + 1])`` over labelled ``t + 1``.
    """
    return logps_from_logits(logits, labels).logps.sum(-1)


def label_counts(labels: torch.Tensor) -> torch.Tensor:
    """Number of labelled (predicted) tokens per sequence.

    Args:
        labels: ``[B, T]`` target ids, ``-100`` where no loss is taken.

    Returns:
        ``[B]`` int64; the first position is never predicted, so it never counts.
    """
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def implicit_rewards(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards ``beta * (log pi(y|x) - log pi_ref(y|x))``, detached.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: ``[B]`` sequence log-probs.
        beta: the KL coefficient.

    Returns:
        ``(chosen, rejected)``, each ``[B]`` float32.
    """
    chosen = beta * (policy_chosen.float() - ref_chosen.float())
    rejected = beta * (policy_rejected.float() - ref_rejected.float())
    return chosen.detach(), rejected.detach()


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair loss of the DPO family, from sequence log-probabilities.

    With ``d = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)`` and
    ``eps = label_smoothing``:

    * ``sigmoid``: DPO, ``-log σ(β d)`` (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290).
      With ``eps > 0`` it is conservative DPO (cDPO, https://ericmitchell.ai/cdpo.pdf):
      ``-(1 - eps) log σ(β d) - eps log σ(-β d)``.
    * ``robust``: robust DPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409):
      ``(-(1 - eps) log σ(β d) + eps log σ(-β d)) / (1 - 2 eps)``, unbiased under label
      noise of rate ``eps`` (``0 <= eps < 0.5``).
    * ``hinge``: SLiC (Zhao et al. 2023, https://arxiv.org/abs/2305.10425) as in TRL,
      ``max(0, 1 - β d)``.
    * ``ipo``: IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, eq. 17)
      ``(d' - 1 / (2β))^2``, where, as in TRL, ``d'`` uses each log-ratio divided by its
      completion length: ``d' = chosen_logratio / chosen_lengths - rejected_logratio /
      rejected_lengths``. Without lengths ``d' = d`` (the paper's sequence-level form).

    Args:
        policy_chosen, policy_rejected: ``[B]`` policy sequence log-probs.
        ref_chosen, ref_rejected: ``[B]`` reference sequence log-probs.
        beta: the KL coefficient (IPO's ``τ``).
        loss_type: ``sigmoid``, ``ipo``, ``hinge`` or ``robust``.
        label_smoothing: the assumed rate of flipped labels (``sigmoid`` and ``robust``).
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts (used by ``ipo``).

    Returns:
        ``[B]`` float32 per-pair losses.
    """
    chosen_logratio = policy_chosen.float() - ref_chosen.float()
    rejected_logratio = policy_rejected.float() - ref_rejected.float()
    delta = chosen_logratio - rejected_logratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    if loss_type == "robust":
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
        clean = -(1 - eps) * F.logsigmoid(beta * delta)
        flipped = -eps * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        if chosen_lengths is not None and rejected_lengths is not None:
            delta = chosen_logratio / chosen_lengths.clamp(min=1) - rejected_logratio / rejected_lengths.clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def simpo_loss(
    policy_chosen_avg: torch.Tensor,
    policy_rejected_avg: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair SimPO loss (Meng et al. 2024, https://arxiv.org/abs/2405.14734, eq. 6).

    Reference-free, on length-averaged log-probs, with a target margin ``gamma``:
    ``-log σ(β (avg_chosen - avg_rejected) - γ)``; with ``label_smoothing = eps`` the
    conservative form ``-(1 - eps) log σ(z) - eps log σ(-z)`` (as TRL ``CPOTrainer``).

    Args:
        policy_chosen_avg, policy_rejected_avg: ``[B]`` mean per-token log-probs of the
            chosen and rejected completions (``sequence_logps / label_counts``).
        beta: the reward scale.
        gamma: the target reward margin.
        label_smoothing: the assumed rate of flipped labels.

    Returns:
        ``[B]`` float32 per-pair losses.
    """
    z = beta * (policy_chosen_avg.float() - policy_rejected_avg.float()) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-pair Bradley–Terry reward-model loss ``-log σ(r_c - r_r - margin)``.

    The margin form is Llama 2's (Touvron et al. 2023, https://arxiv.org/abs/2307.09288, eq. 2);
    without a margin it is the InstructGPT loss (https://arxiv.org/abs/2203.02155, eq. 1).

    Args:
        r_chosen, r_rejected: ``[B]`` scalar rewards of the chosen and rejected sequences.
        margin: ``[B]`` how much better the chosen is known to be (``None``: 0).

    Returns:
        ``[B]`` float32 per-pair losses.
    """
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff)
