"""Divergences between two next-token distributions, given as log-probabilities.

Distillation losses compare a student's distribution with a teacher's at every position:
the weak-to-strong plugin's soft-label and token distillation, and on-policy distillation
(GKD) in the rl plugin. They share this one implementation of the three divergences, so a
fix or a check (TRL's ``GKDTrainer.generalized_jsd_loss``, tests/test_gkd.py and
tests/test_w2s_losses.py) covers every method that uses them.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

#: The divergences :func:`token_divergence` computes.
Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` over the last dimension, from log-probabilities: ``[..., V]`` -> ``[...]``."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)


def token_divergence(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    kind: Divergence = "forward_kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-position divergence between teacher and student next-token distributions.

    * ``forward_kl``: ``KL(teacher || student)`` (mode covering; TRL GKD ``beta=0``).
    * ``reverse_kl``: ``KL(student || teacher)`` (mode seeking; TRL GKD ``beta=1``).
    * ``jsd``: generalized JSD of GKD (Agarwal et al. 2023, eq. 1,
      https://arxiv.org/abs/2306.13649) with TRL's convention
      ``beta * KL(teacher || m) + (1 - beta) * KL(student || m)`` and
      ``m = beta * teacher + (1 - beta) * student``, for ``0 < beta < 1``.

    Args:
        student_log_probs: ``[..., V]`` student log-probabilities.
        teacher_log_probs: ``[..., V]`` teacher log-probabilities.
        kind: which divergence.
        beta: the JSD interpolation weight (only for ``jsd``).

    Returns:
        ``[...]`` divergence per position.

    Raises:
        ValueError: an unknown ``kind``, or ``jsd`` with ``beta`` outside ``(0, 1)``.
    """
    if kind == "forward_kl":
        return kl_divergence(teacher_log_probs, student_log_probs)
    if kind == "reverse_kl":
        return kl_divergence(student_log_probs, teacher_log_probs)
    if kind == "jsd":
        if not 0 < beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}; use forward_kl (beta 0) or reverse_kl (beta 1)")
        mixture = torch.logsumexp(
            torch.stack([student_log_probs + math.log1p(-beta), teacher_log_probs + math.log(beta)]), dim=0
        )
        return beta * kl_divergence(teacher_log_probs, mixture) + (1 - beta) * kl_divergence(student_log_probs, mixture)
    raise ValueError(f"unknown divergence {kind!r}; choose forward_kl, reverse_kl or jsd")
