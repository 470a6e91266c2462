"""Online policy losses: GRPO and PPO, the clipped surrogate with a KL penalty to the reference.

Both read rollouts (``rollout`` data): token log-probs at sampling time (``old_logps``),
the reference's (``ref_logps``) and per-token ``advantages``. PPO also trains a value
head on the policy's last hidden state with PPO's clipped value loss, against the
``returns`` a value-based advantage estimator (``gae``) computed at sampling time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from aligntk import (
    IGNORE_INDEX,
    Batch,
    ChunkSize,
    ComponentConfig,
    LossCapabilities,
    LossOutput,
    Models,
    TrainingError,
    logps_from_logits,
    part,
    token_logps,
)

from .estimators import clipped_value_loss
from .variants import ImportanceSampling, importance_ratio, token_entropy, top_entropy_mask


class ValueHead(torch.nn.Module):
    """A scalar value per position from the policy's last hidden state (zero at start)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


@dataclass
class PolicyOutputs:
    """Per-token outputs of one forward pass, ``[B, T]`` each, aligned with ``input_ids``.

    ``logps[:, t]`` is the log-probability of completion token ``t`` (0 off the
    completion), ``entropy`` the predictive entropy there (detached unless asked for with
    ``entropy_grad``), ``values[:, t]``
    the value head's estimate before token ``t`` (``None`` without a head).
    """

    logps: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor | None = None


def policy_forward(
    model: torch.nn.Module,
    batch: Batch,
    value_head: torch.nn.Module | None = None,
    chunk_size: ChunkSize = "auto",
    entropy_grad: bool = False,
) -> PolicyOutputs:
    """Log-probs and entropy of the completion tokens (and values, with a value head).

    Without a value head the output layer runs in chunks on completion tokens only
    (``aligntk.token_logps``), so a large vocabulary never costs ``[B, T, V]`` float32
    logits; a value head needs the last hidden states, and a differentiable entropy
    (``entropy_grad``, for an entropy bonus) the full logits, so they take the plain path.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if value_head is None and not entropy_grad:
        out = token_logps(model, **inputs, labels=batch["labels"], chunk_size=chunk_size, with_entropy=True)
        return PolicyOutputs(out.logps, out.entropy)
    if value_head is None:
        logits = model(**inputs, use_cache=False).logits
        out = logps_from_logits(logits, batch["labels"])
        return PolicyOutputs(out.logps, token_entropy(logits, batch["labels"]))
    hidden_out = model(**inputs, use_cache=False, output_hidden_states=True)
    out = logps_from_logits(hidden_out.logits, batch["labels"], with_entropy=not entropy_grad)
    entropy = token_entropy(hidden_out.logits, batch["labels"]) if entropy_grad else out.entropy
    values = value_head(hidden_out.hidden_states[-1][:, :-1])
    return PolicyOutputs(out.logps, entropy, torch.nn.functional.pad(values, (1, 0)))


class GRPOConfig(ComponentConfig):
    """Options of the ``grpo`` loss (and, with more, of ``ppo``).

    The defaults are GRPO as the paper and aligntk's first version had it; where TRL
    1.16's ``GRPOConfig`` defaults differ, docs/rl.md names each difference.

    Attributes:
        epsilon, epsilon_high: ratio clip range ``[1 - epsilon, 1 + epsilon_high]``
            (``epsilon_high`` defaults to ``epsilon``; DAPO raises it).
        beta: weight of the per-token KL penalty to the reference policy (0: none).
        kl: a registered KL estimator: ``k1``, ``k2`` or ``k3``.
        kl_bias_correction: multiply the KL estimate by the importance ratio (TRL's
            ``use_bias_correction_kl``; DeepSeek-V3.2): the unbiased reverse-KL gradient
            off-policy, and a different gradient on-policy too.
        aggregation: a registered aggregation: ``token`` (every completion token weighs
            the same, as DAPO), ``sequence`` (each completion's token mean, then the mean
            over completions, as the GRPO paper) or ``fixed_length`` (Dr. GRPO).
        surrogate: a registered surrogate: ``clip`` (PPO's clipped ratio; ``delta``:
            two-sided clipping), ``cispo`` or ``sapo``.
        importance_sampling: ``token`` (one ratio per token) or ``sequence`` (GSPO: the
            geometric mean of a completion's token ratios, one per completion).
        entropy_coef: weight of an entropy bonus (``- entropy_coef * H`` per token,
            reduced by the aggregation); non-zero takes the full-logits path.
        top_entropy_quantile: keep the policy term only on the completion tokens whose
            entropy is in this top fraction of the micro-batch's (1: every token).
        chunk_size: completion tokens per output-layer chunk (``0``: full logits;
            ``auto``: chunks of 1024 from a 16k vocabulary up), as the ``sft`` loss's.
    """

    epsilon: float = Field(0.2, gt=0)
    epsilon_high: float | None = Field(None, gt=0)
    beta: float = Field(0.04, ge=0)
    kl: part("kl") = "k3"
    kl_bias_correction: bool = False
    aggregation: part("aggregation") = "token"
    surrogate: part("surrogate") = "clip"
    importance_sampling: ImportanceSampling = "token"
    entropy_coef: float = 0.0
    top_entropy_quantile: float = Field(1.0, ge=0, le=1)
    chunk_size: ChunkSize = "auto"


class GRPOLoss:
    """The clipped surrogate on sampled completions, with advantages from the data."""

    Config = GRPOConfig
    # old_logps and ref_logps are read when the batch has them (rollout data leaves out the
    # old ones when the policy has not changed since sampling).
    requires = frozenset({"input_ids", "attention_mask", "labels", "advantages", "rewards"})
    roles = ("policy", "reference")

    def __init__(self, config: GRPOConfig):
        self.config = config
        self.kl = config.kl.build()
        self.aggregate = config.aggregation.build()
        self.surrogate = config.surrogate.build()

    def count(self, batch: Batch) -> torch.Tensor:
        return self.aggregate.count((batch["labels"] != IGNORE_INDEX).float())

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        c = self.config
        out = policy_forward(models.policy, batch, chunk_size=c.chunk_size, entropy_grad=c.entropy_coef != 0)
        loss_sum, metrics = self.policy_terms(out, batch)
        return LossOutput(sum=loss_sum, count=self.count(batch).to(loss_sum.device), metrics=metrics)

    def policy_terms(self, out: PolicyOutputs, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        """The aggregated surrogate + KL penalty (- entropy bonus), and the metrics every online loss logs.

        The order of the terms is TRL's ``_compute_loss``: the surrogate, masked to the
        high-entropy tokens, plus ``beta`` times the (bias-corrected) KL, minus the bonus.
        """
        c = self.config
        mask = (batch["labels"] != IGNORE_INDEX).float()
        advantages = batch["advantages"]
        advantages = advantages[:, None] if advantages.dim() == 1 else advantages
        # No old log-probs: the rows were sampled by this very policy (one iteration), so the
        # old ones are its own, detached (ratio 1, gradient of log-prob), as TRL does.
        old = batch["old_logps"] if "old_logps" in batch else out.logps.detach()
        ref = batch["ref_logps"] if "ref_logps" in batch else old
        ratio = importance_ratio(out.logps, old, mask, c.importance_sampling)
        surrogate, clipped = self.surrogate(ratio, out.logps, advantages, c.epsilon, c.epsilon_high or c.epsilon)
        entropy = out.entropy
        high = None
        if c.top_entropy_quantile < 1.0:
            high = top_entropy_mask(entropy, mask, c.top_entropy_quantile).to(surrogate.dtype)
            surrogate = surrogate * high
        if "sampling/importance_ratio" in batch:  # rollouts from another sampler (vllm): TRL's IS correction
            surrogate = surrogate * batch["sampling/importance_ratio"]
        kl = self.kl(out.logps, ref)
        if c.kl_bias_correction:
            kl = kl * ratio
        per_token = surrogate + c.beta * kl
        if c.entropy_coef != 0:
            per_token = per_token - c.entropy_coef * (entropy if high is None else entropy * high)
        loss_sum = self.aggregate(per_token, mask)
        n_tokens, n_seqs = mask.sum(), torch.tensor(float(mask.size(0)), device=mask.device)
        entropy = entropy.detach()
        metrics = {
            "reward": (batch["rewards"].float().sum(), n_seqs),
            "kl": ((kl.detach() * mask).sum(), n_tokens),
            "clip_fraction": ((clipped.float() * mask).sum(), n_tokens),
            "entropy": ((entropy * mask).sum(), n_tokens),
            "completion_length": (n_tokens, n_seqs),
            # each reward's own mean (rollout data's reward/<name> fields)
            **{k: (v.float().sum(), n_seqs) for k, v in batch.items() if k.startswith("reward/")},
            # the sampler/trainer mismatch (rollout data's per-token sampling/<name> fields)
            **{k: ((v.float() * mask).sum(), n_tokens) for k, v in batch.items() if k.startswith("sampling/")},
        }
        if high is not None:
            metrics["high_entropy_fraction"] = ((high * mask).sum().detach(), n_tokens)
        return loss_sum, metrics


class PPOConfig(GRPOConfig):
    """Options of the ``ppo`` loss: ``grpo``'s, plus the value head's.

    Attributes:
        vf_coef: weight of the value loss.
        value_clip: the new value may move at most this far from its value at sampling
            time before the clipped term takes over.
        beta: defaults to 0 here: PPO usually puts the KL penalty in the reward
            (``data.advantage: {name: gae, kl_coef: ...}``).
    """

    beta: float = Field(0.0, ge=0)
    vf_coef: float = Field(0.1, ge=0)
    value_clip: float = Field(0.2, gt=0)


class PPOLoss(GRPOLoss):
    """PPO with a learned value head: clipped surrogate on GAE advantages + clipped value loss.

    The value head is a trainable head on the policy (``heads``), so the engine trains,
    clips, checkpoints and saves it with the policy; the rollout data runs it at
    sampling time to get the old values GAE needs.
    """

    Config = PPOConfig
    requires = GRPOLoss.requires | {"old_values", "returns"}

    @classmethod
    def capabilities(cls, config: PPOConfig) -> LossCapabilities:
        return LossCapabilities(heads=True)

    def heads(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        return {"value": ValueHead(model.config.hidden_size)}

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        if "returns" not in batch:
            raise TrainingError(
                "loss ppo trains a value head on returns; set the data's advantage to a value-based "
                "estimator (data.advantage: gae)"
            )
        c = self.config
        out = policy_forward(models.policy, batch, models.heads["value"], entropy_grad=c.entropy_coef != 0)
        loss_sum, metrics = self.policy_terms(out, batch)
        mask = (batch["labels"] != IGNORE_INDEX).float()
        values = out.values
        assert values is not None
        value_loss, value_clipped = clipped_value_loss(values, batch["old_values"], batch["returns"], c.value_clip)
        value_sum = self.aggregate(value_loss, mask)
        n_tokens = mask.sum()
        metrics["value_loss"] = (value_sum.detach(), self.count(batch).to(value_sum.device).float())
        metrics["value_clip_fraction"] = ((value_clipped.float() * mask).sum(), n_tokens)
        metrics["value"] = ((values.detach() * mask).sum(), n_tokens)
        return LossOutput(
            sum=loss_sum + c.vf_coef * value_sum, count=self.count(batch).to(loss_sum.device), metrics=metrics
        )
