"""GRPO / PPO-style clipped policy loss with a KL penalty to the reference policy."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from aligntk import Batch, ComponentConfig, LossOutput, Models

from .estimators import KL_ESTIMATORS, clipped_surrogate, token_logps


class GRPOConfig(ComponentConfig):
    """Options of the ``grpo`` loss.

    Attributes:
        epsilon, epsilon_high: ratio clip range ``[1 - epsilon, 1 + epsilon_high]``
            (``epsilon_high`` defaults to ``epsilon``; DAPO raises it).
        beta: weight of the per-token KL penalty to the reference policy.
        kl: ``k1`` (log-ratio) or ``k3`` (``exp(d) - d - 1``) estimator.
        aggregation: ``token`` (every completion token weighs the same, as DAPO) or
            ``sequence`` (each completion's token mean, then the mean over completions,
            as the GRPO paper).
    """

    epsilon: float = Field(0.2, gt=0)
    epsilon_high: float | None = Field(None, gt=0)
    beta: float = Field(0.04, ge=0)
    kl: Literal["k1", "k3"] = "k3"
    aggregation: Literal["token", "sequence"] = "token"


class GRPOLoss:
    """The clipped surrogate on sampled completions, with group-normalized advantages from the data."""

    Config = GRPOConfig
    requires = frozenset({"input_ids", "attention_mask", "labels", "old_logps", "ref_logps", "advantages", "rewards"})
    roles = ("policy", "reference")

    def __init__(self, config: GRPOConfig):
        self.config = config

    def count(self, batch: Batch) -> torch.Tensor:
        if self.config.aggregation == "token":
            return (batch["labels"] != -100).sum()
        return torch.tensor(batch["labels"].size(0))

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        c = self.config
        logits = models.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logps = token_logps(logits, batch["input_ids"])
        mask = (batch["labels"] != -100).float()
        surrogate, clipped = clipped_surrogate(
            logps, batch["old_logps"], batch["advantages"], c.epsilon, c.epsilon_high or c.epsilon
        )
        kl = KL_ESTIMATORS[c.kl](logps, batch["ref_logps"])
        per_token = (surrogate + c.beta * kl) * mask
        lengths = mask.sum(dim=1)
        if c.aggregation == "token":
            loss_sum = per_token.sum()
        else:
            loss_sum = (per_token.sum(dim=1) / lengths.clamp(min=1)).sum()
        n_tokens, n_seqs = mask.sum(), torch.tensor(float(mask.size(0)), device=mask.device)
        with torch.no_grad():
            probs = torch.softmax(logits[:, :-1].float(), dim=-1)
            entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum(-1)
            entropy = torch.nn.functional.pad(entropy, (1, 0))
        metrics = {
            "reward": (batch["rewards"].float().sum(), n_seqs),
            "kl": ((kl.detach() * mask).sum(), n_tokens),
            "clip_fraction": ((clipped.float() * mask).sum(), n_tokens),
            "entropy": ((entropy * mask).sum(), n_tokens),
            "completion_length": (lengths.sum(), n_seqs),
        }
        return LossOutput(sum=loss_sum, count=self.count(batch).to(loss_sum.device), metrics=metrics)
