"""Advantage and KL estimators shared by the online policy-optimization losses.

Small pure functions so that every method is compared under the same normalization.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-normalized advantages (Shao et al. 2024, https://arxiv.org/abs/2402.03300).

    Args:
        rewards: ``[P, G]``: ``G`` completions for each of ``P`` prompts.
        eps: added to the group's standard deviation; a group whose rewards are all equal
            gets advantage 0, not NaN.

    Returns:
        ``[P, G]`` ``(r - mean_g) / (std_g + eps)`` (unbiased std, as TRL's GRPO).
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.size(1) > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


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


ADVANTAGES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"group": group_advantages, "rloo": rloo_advantages}


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token ``log pi - log pi_ref`` (unbiased for KL(pi || ref), can be negative). Any shape."""
    return logps - ref_logps


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token ``exp(d) - d - 1`` with ``d = log pi_ref - log pi`` (Schulman's k3: unbiased, >= 0)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"k1": kl_k1, "k3": kl_k3}


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token given those before it, aligned with ``input_ids``.

    Args:
        logits: ``[B, T, V]``; position ``t`` predicts token ``t + 1``.
        input_ids: ``[B, T]``.

    Returns:
        ``[B, T]`` float32; position 0 (no prediction) is 0.
    """
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(picked, (1, 0))


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
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    return -torch.min(unclipped, clipped), clipped < unclipped
