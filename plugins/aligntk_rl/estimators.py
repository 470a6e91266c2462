"""Advantage estimators, KL estimators and loss aggregations: registered parts.

Every online method picks them by name (``advantage: rloo``, ``kl: k3``,
``aggregation: sequence``), so methods are compared under the same normalization.
Each is a pure function of tensors plus a small component class around it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, PositiveInt, field_validator

from aligntk import ComponentConfig

from .protocols import Scored


class _Configured:
    """Every estimator and aggregation is built from its options and keeps them."""

    def __init__(self, config: Any):
        self.config = config  # the subclass's own Config


# --------------------------------------------------------------------------------------
# Advantage estimators
# --------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: bool | str = True) -> torch.Tensor:
    """GRPO's group-normalized advantages (Shao et al. 2024, https://arxiv.org/abs/2402.03300).

    Args:
        rewards: ``[P, G]``: ``G`` completions for each of ``P`` prompts.
        eps: added to the standard deviation; a group whose rewards are all equal gets
            advantage 0, not NaN.
        scale: what the centered reward is divided by: ``"group"`` (or ``True``) the
            group's standard deviation, ``"batch"`` the standard deviation of all ``P * G``
            rewards (PPO Lite, https://arxiv.org/abs/2508.08221), ``"none"`` (or ``False``)
            nothing (Dr. GRPO, https://arxiv.org/abs/2503.20783). TRL's ``scale_rewards``.

    Returns:
        ``[P, G]`` ``(r - mean_g) / (std + eps)`` (unbiased std, as TRL's GRPO), or ``r - mean_g``.
    """
    scale = _SCALE_ALIASES.get(scale, scale) if isinstance(scale, bool) else scale
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centered
    if scale == "group":
        std = rewards.std(dim=1, keepdim=True) if rewards.size(1) > 1 else torch.zeros_like(centered[:, :1])
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return centered / (std + eps)


_SCALE_ALIASES = {True: "group", False: "none"}
RewardScale = Literal["group", "batch", "none"]


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740).

    Args:
        rewards: ``[P, G]`` with ``G >= 2``.

    Returns:
        ``[P, G]``: each reward minus the mean of the other ``G - 1`` in its group.
    """
    g = rewards.size(1)
    if g < 2:
        raise ValueError("leave-one-out needs at least 2 completions per prompt")
    return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (g - 1)


def gae(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438).

    Each row's completion tokens (``mask``) are one episode; the value after its last
    token is 0. ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``.

    Args:
        token_rewards, values, mask: ``[N, T]``, aligned with the token ids.

    Returns:
        ``(advantages, returns)``, ``[N, T]`` each, 0 off the mask; ``returns = A + V``.
    """
    n, t_max = mask.shape
    advantages = torch.zeros_like(values)
    running = torch.zeros(n, dtype=values.dtype, device=values.device)
    for t in reversed(range(t_max)):
        if t + 1 < t_max:
            next_mask = mask[:, t + 1]
            next_value = values[:, t + 1] * next_mask
        else:
            next_mask = next_value = torch.zeros_like(running)
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running * next_mask) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the masked entries; 0 off the mask."""
    n = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / n
    var = (((values - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + eps) * mask


class GroupConfig(ComponentConfig):
    """Options of ``group``.

    Attributes:
        scale: divide the centered reward by the group's std (``group``, GRPO), by the
            std over the rollout batch (``batch``: each process's share of it) or by
            nothing (``none``: Dr. GRPO); ``true`` / ``false`` mean ``group`` / ``none``,
            as TRL's ``scale_rewards``.
        eps: added to the std.
    """

    scale: RewardScale = "group"
    eps: float = Field(1e-4, ge=0)

    @field_validator("scale", mode="before")
    @classmethod
    def _bool_scale(cls, value: Any) -> Any:
        return _SCALE_ALIASES.get(value, value) if isinstance(value, bool) else value


class GroupAdvantage(_Configured):
    """Every token of a completion gets its group-normalized reward (GRPO)."""

    Config = GroupConfig
    needs_values: ClassVar[bool] = False

    def __call__(self, scored: Scored) -> tuple[torch.Tensor, None]:
        per_seq = group_advantages(scored.rewards.view(-1, scored.group_size), self.config.eps, self.config.scale)
        return per_seq.reshape(-1, 1) * scored.mask, None


class RLOOConfig(ComponentConfig):
    """``rloo`` has no options."""


class RLOOAdvantage(_Configured):
    """Every token of a completion gets its reward minus the mean of the rest of its group."""

    Config = RLOOConfig
    needs_values: ClassVar[bool] = False

    def __call__(self, scored: Scored) -> tuple[torch.Tensor, None]:
        per_seq = rloo_advantages(scored.rewards.view(-1, scored.group_size))
        return per_seq.reshape(-1, 1) * scored.mask, None


class GAEConfig(ComponentConfig):
    """Options of ``gae``.

    Attributes:
        gamma, lam: discount and GAE's bias/variance trade-off.
        kl_coef: per-token reward ``-kl_coef * (log pi_old - log pi_ref)`` (InstructGPT's
            KL penalty inside the reward); 0 leaves the KL to the loss's ``beta``.
        whiten: normalize advantages over the rollout's completion tokens.
    """

    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    kl_coef: float = Field(0.0, ge=0)
    whiten: bool = True


class GAEAdvantage(_Configured):
    """PPO's advantages from a learned value head: the sequence reward on the last
    completion token, an optional per-token KL penalty, then GAE."""

    Config = GAEConfig
    needs_values: ClassVar[bool] = True

    def __call__(self, scored: Scored) -> tuple[torch.Tensor, torch.Tensor]:
        c, mask = self.config, scored.mask
        if scored.values is None:
            raise ValueError("gae needs the value head's estimates at sampling time")
        token_rewards = torch.zeros_like(mask)
        if c.kl_coef and scored.ref_logps is not None:
            token_rewards = -c.kl_coef * (scored.logps - scored.ref_logps) * mask
        positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
        last = (positions * mask).argmax(dim=1)  # each completion's final token
        token_rewards[torch.arange(mask.size(0)), last] += scored.rewards.to(mask.dtype)
        advantages, returns = gae(token_rewards, scored.values * mask, mask, c.gamma, c.lam)
        return (whiten(advantages, mask) if c.whiten else advantages), returns


# --------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence", 2020)
# --------------------------------------------------------------------------------------


class KLConfig(ComponentConfig):
    """KL estimators have no options."""


class K1(_Configured):
    """``log pi - log pi_ref``: unbiased for KL(pi || ref), can be negative."""

    Config = KLConfig

    def __call__(self, logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
        return logps - ref_logps


class K2(_Configured):
    """``(log pi - log pi_ref)^2 / 2``: biased, low variance, >= 0."""

    Config = KLConfig

    def __call__(self, logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
        return 0.5 * (logps - ref_logps) ** 2


class K3(_Configured):
    """``exp(d) - d - 1`` with ``d = log pi_ref - log pi``: unbiased and >= 0 (GRPO's choice)."""

    Config = KLConfig

    def __call__(self, logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
        d = ref_logps - logps
        return torch.exp(d) - d - 1


# --------------------------------------------------------------------------------------
# Aggregations: per-token loss [B, T] -> a sum, and the units it is over
# --------------------------------------------------------------------------------------


class AggregationConfig(ComponentConfig):
    """``token`` and ``sequence`` have no options."""


class TokenMean(_Configured):
    """Every completion token weighs the same (DAPO): sum over tokens / global token count."""

    Config = AggregationConfig

    def __call__(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (per_token * mask).sum()

    def count(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.sum()


class SequenceMean(_Configured):
    """Each completion's token mean, then the mean over completions (the GRPO paper)."""

    Config = AggregationConfig

    def __call__(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()

    def count(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.tensor(mask.size(0), device=mask.device)


class FixedLengthConfig(ComponentConfig):
    """Options of ``fixed_length``: ``tokens``, the constant each completion's sum is divided by."""

    tokens: PositiveInt = 16


class FixedLength(_Configured):
    """Each completion's token sum divided by a constant, then the mean over completions
    (Dr. GRPO, https://arxiv.org/abs/2503.20783: no length bias from the normalizer)."""

    Config = FixedLengthConfig

    def __call__(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (per_token * mask).sum() / self.config.tokens

    def count(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.tensor(mask.size(0), device=mask.device)


# --------------------------------------------------------------------------------------
# The clipped surrogate and the clipped value loss
# --------------------------------------------------------------------------------------


def clipped_surrogate(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, as a loss (Schulman et al. 2017).

    Args:
        logps, old_logps: ``[B, T]`` token log-probs now and at sampling time.
        advantages: ``[B]`` (one per sequence) or ``[B, T]``.

    Returns:
        ``(loss [B, T], clipped [B, T])``: ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)``
        and whether the clipped term was the one taken.
    """
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    return clipped_ratio_objective(torch.exp(logps - old_logps), adv, eps_low, eps_high)


def clipped_ratio_objective(
    ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float, delta: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate from the importance ratio: ``-min(r' A, clip(r, 1-eps_low, 1+eps_high) A)``.

    ``r' = min(r, delta)`` with two-sided clipping (INTELLECT-2,
    https://arxiv.org/abs/2505.07291: a negative advantage cannot push a ratio above
    ``delta``), else ``r``.

    Args:
        ratio: ``[B, T]`` per token, or ``[B, 1]`` one per sequence (GSPO).
        adv: ``[B, T]`` advantages.

    Returns:
        ``(loss [B, T], clipped [B, T])``: the loss and where it has no gradient (a
        clipped term was the one taken).
    """
    bounded = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    unclipped = capped * adv
    clipped = bounded < unclipped
    if delta is not None:
        clipped = clipped | ((ratio > delta) & (adv < 0))
    return -torch.min(unclipped, bounded), clipped


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token: ``max((V - R)^2, (V_old + clip(V - V_old) - R)^2) / 2``.

    Returns:
        ``(loss [B, T], clipped [B, T])``: the loss and whether the clipped term was taken.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    plain = (values - returns) ** 2
    limited = (clipped_values - returns) ** 2
    return 0.5 * torch.max(plain, limited), limited > plain
