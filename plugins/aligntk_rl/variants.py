"""GRPO variants: policy surrogates (registered parts of kind ``surrogate``) and the pieces
the ``grpo`` loss's options switch on (sequence-level ratios, top-entropy token masks,
a differentiable entropy).

Each surrogate maps the importance ratio and the advantages to a per-token loss, as TRL
1.16's ``GRPOTrainer._compute_loss`` does for its ``loss_type`` values; the loss's
aggregation then reduces it (``sequence`` is TRL's ``grpo``, ``token`` its ``dapo`` and
``bnpo``, ``fixed_length`` its ``dr_grpo``). ``tests/test_grpo_variants.py`` runs TRL's
own code on the same tensors.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import Field

from aligntk import IGNORE_INDEX, ComponentConfig

from .estimators import clipped_ratio_objective

ImportanceSampling = Literal["token", "sequence"]


@runtime_checkable
class Surrogate(Protocol):
    """A per-token policy loss from the importance ratio (kind ``surrogate``).

    ``__call__(ratio, logps, advantages, eps_low, eps_high)``: ``ratio`` ``[B, T]`` (or
    ``[B, 1]``, one per sequence), ``logps`` the differentiable token log-probs ``[B, T]``,
    ``advantages`` ``[B, T]``, and the loss's clip range. Returns ``(loss [B, T],
    clipped [B, T] bool)``, ``clipped`` marking where the surrogate cut the gradient
    (logged as ``clip_fraction``).
    """

    Config: ClassVar[type[ComponentConfig]]

    def __call__(
        self, ratio: torch.Tensor, logps: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class ClipConfig(ComponentConfig):
    """Options of ``clip``: ``delta``, an upper cap on the ratio (two-sided clipping; off when ``null``)."""

    delta: float | None = Field(None, gt=1)


class ClipSurrogate:
    """PPO's clipped surrogate (GRPO, DAPO, Dr. GRPO, GSPO); TRL's ``delta`` as an option."""

    Config = ClipConfig

    def __init__(self, config: ClipConfig):
        self.config = config

    def __call__(
        self, ratio: torch.Tensor, logps: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return clipped_ratio_objective(ratio, advantages, eps_low, eps_high, self.config.delta)


class CISPOConfig(ComponentConfig):
    """Options of ``cispo``: ``epsilon_max``, the cap on the (detached) ratio (TRL: ``epsilon_high``)."""

    epsilon_max: float = Field(5.0, gt=0)


class CISPOSurrogate:
    """CISPO (MiniMax-M1, https://arxiv.org/abs/2506.13585): ``-sg(min(r, eps_max)) A log pi``.

    The ratio is clipped and detached, so every token keeps the REINFORCE gradient,
    scaled by the clipped weight; ``clipped`` marks ``r > eps_max`` with ``A > 0``.
    """

    Config = CISPOConfig

    def __init__(self, config: CISPOConfig):
        self.config = config

    def __call__(
        self, ratio: torch.Tensor, logps: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.clamp(ratio, max=self.config.epsilon_max).detach()
        return -weight * advantages * logps, (ratio > self.config.epsilon_max) & (advantages > 0)


class SAPOConfig(ComponentConfig):
    """Options of ``sapo``: the gate's temperatures for positive and for other advantages."""

    temperature_pos: float = Field(1.0, gt=0)
    temperature_neg: float = Field(1.05, gt=0)


class SAPOSurrogate:
    """SAPO (https://arxiv.org/abs/2511.20347): ``-(4 / tau) sigmoid(tau (r - 1)) A``.

    A smooth gate in place of the hard clip, ``tau`` by the advantage's sign; nothing is
    clipped, so ``clipped`` is all false.
    """

    Config = SAPOConfig

    def __init__(self, config: SAPOConfig):
        self.config = config

    def __call__(
        self, ratio: torch.Tensor, logps: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        tau = torch.where(advantages > 0, c.temperature_pos, c.temperature_neg)
        loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages
        return loss, torch.zeros_like(loss, dtype=torch.bool)


def importance_ratio(
    logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, level: ImportanceSampling
) -> torch.Tensor:
    """``pi / pi_old`` per token ``[B, T]``, or per sequence ``[B, 1]``.

    ``sequence`` is GSPO's (Zheng et al. 2025, https://arxiv.org/abs/2507.18071):
    ``exp(mean_t(log pi - log pi_old))`` over each completion's tokens, as TRL's
    ``importance_sampling_level="sequence"``.
    """
    log_ratio = logps - old_logps
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        mean = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return torch.exp(mean).unsqueeze(-1)
    raise ValueError(f"importance_sampling must be 'token' or 'sequence', got {level!r}")


def top_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """The completion tokens whose entropy is in the top ``quantile`` (Wang et al. 2025,
    https://arxiv.org/abs/2506.01939), as TRL's ``get_high_entropy_mask``.

    The threshold is the ``1 - quantile`` quantile (linear interpolation) of the entropies
    on ``mask``; tokens at or above it are kept. ``quantile`` 0 keeps only the highest.

    Args:
        entropy, mask: ``[B, T]``.

    Returns:
        ``[B, T]`` bool, false off the mask.
    """
    on = mask.bool()
    values = entropy.detach()[on].float()
    if values.numel() == 0:
        return torch.zeros_like(on)
    threshold = torch.quantile(values, 1 - quantile)
    return ((entropy.detach() * mask) >= threshold.to(entropy.dtype)) & on


def token_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Differentiable entropy of the next-token distribution, aligned like token log-probs.

    Args:
        logits: ``[B, T, V]``; upcast to float32 (float64 stays float64).
        labels: ``[B, T]``, ``-100`` where nothing is scored.

    Returns:
        ``[B, T]``: at ``t`` the entropy of the distribution that scores token ``t`` (the
        logits at ``t - 1``), 0 at position 0 and where ``labels`` is ``-100``.
    """
    keep = labels[:, 1:] != IGNORE_INDEX
    logits = logits[:, :-1]
    logps = (logits if logits.dtype == torch.float64 else logits.float()).log_softmax(-1)
    entropy = torch.where(keep, -(logps.exp() * logps).sum(-1), 0.0)
    return torch.nn.functional.pad(entropy, (1, 0))

