"""Rejection-sampling fine-tuning (best-of-N; RAFT, ReST): keep the best samples, train on them with SFT.

Two registered pieces, because a choice within each prompt's group can only be made
where the groups are visible:

* advantage ``best_of_n`` (kind ``advantage``, ``data.advantage``): ranks each prompt's
  ``G`` sampled completions by reward and keeps the ``k`` best (``k``), those at or above
  a reward (``threshold``), or the ``k`` best of those above it (both). It gives each
  token of a kept completion advantage 1.0, every other token 0.0.
* loss ``best_of_n``: the SFT loss on the kept completions: ``-log pi`` summed over
  their tokens, divided by their token count over the global batch (a token mean over
  what was kept), and the acceptance rate and mean kept reward as metrics.

RAFT: Dong et al. 2023, https://arxiv.org/abs/2304.06767 (top-1 of ``G``). ReST: Gulcehre
et al. 2023, https://arxiv.org/abs/2308.08998 (a reward threshold).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import PositiveInt, model_validator

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

from .protocols import Scored


def best_of_n_keep(rewards: torch.Tensor, k: int | None, threshold: float | None) -> torch.Tensor:
    """Which completions of each group to keep.

    Args:
        rewards: ``[P, G]``: ``G`` completions for each of ``P`` prompts.
        k: keep at most the ``k`` highest rewards of each group (ties go to the earlier
            sample, which is as random as any: samples are drawn independently); ``None``:
            no limit.
        threshold: keep only rewards ``>= threshold``; ``None``: no floor.

    Returns:
        ``[P, G]`` bool.
    """
    keep = torch.ones_like(rewards, dtype=torch.bool)
    if threshold is not None:
        keep &= rewards >= threshold
    if k is not None and k < rewards.size(1):
        order = torch.sort(rewards, dim=1, descending=True, stable=True).indices[:, :k]
        top = torch.zeros_like(keep).scatter_(1, order, True)
        keep &= top
    return keep


class BestOfNConfig(ComponentConfig):
    """Options of the ``best_of_n`` advantage: ``k`` best per prompt and/or a reward ``threshold``.

    Attributes:
        k: keep the ``k`` best completions of each prompt (``null``: all that pass ``threshold``).
        threshold: keep only completions whose reward is at least this (``null``: no floor).
    """

    k: PositiveInt | None = 1
    threshold: float | None = None

    @model_validator(mode="after")
    def _one_rule(self) -> BestOfNConfig:
        if self.k is None and self.threshold is None:
            raise ValueError("set k (the best k per prompt), threshold (a reward floor) or both")
        return self


class BestOfNSelection:
    """Advantage 1.0 on every token of a kept completion, 0.0 elsewhere (for the ``best_of_n`` loss)."""

    Config = BestOfNConfig
    needs_values: ClassVar[bool] = False

    def __init__(self, config: BestOfNConfig):
        self.config = config

    def __call__(self, scored: Scored) -> tuple[torch.Tensor, None]:
        grouped = scored.rewards.view(-1, scored.group_size)
        keep = best_of_n_keep(grouped, self.config.k, self.config.threshold).reshape(-1, 1)
        return keep.to(scored.mask.dtype) * scored.mask, None


def kept_tokens(batch: Batch) -> torch.Tensor:
    """``[B, T]`` bool: completion tokens of the completions the data's selection kept."""
    return (batch["labels"] != IGNORE_INDEX) & (batch["advantages"] > 0)


class BestOfNLossConfig(ComponentConfig):
    """Options of the ``best_of_n`` loss (which completions count is ``data.advantage: best_of_n``'s choice).

    Attributes:
        chunk_size: as the ``sft`` loss's: kept tokens per output-layer chunk (``0``: full logits).
    """

    chunk_size: ChunkSize = "auto"


class BestOfNLoss:
    """SFT on the kept completions: summed ``-log pi`` over their tokens; the engine divides by their count."""

    Config = BestOfNLossConfig
    requires = frozenset({"input_ids", "attention_mask", "labels", "advantages", "rewards"})
    roles = ("policy",)

    def __init__(self, config: BestOfNLossConfig):
        self.config = config

    def count(self, batch: Batch) -> torch.Tensor:
        return kept_tokens(batch).sum()

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        completion = batch["labels"] != IGNORE_INDEX
        adv = batch["advantages"][completion]
        if not bool(((adv == 0) | (adv == 1)).all()):
            raise TrainingError(
                "loss best_of_n trains on the completions a selection keeps; set the data's advantage to "
                "best_of_n (data.advantage: {name: best_of_n, k: 1})"
            )
        keep = kept_tokens(batch)
        labels = batch["labels"].masked_fill(~keep, IGNORE_INDEX)  # the output layer runs on kept tokens only
        out = token_logps(
            models.policy, batch["input_ids"], batch["attention_mask"], labels=labels, chunk_size=self.config.chunk_size
        )
        nll_sum = -(out.logps * keep).sum()
        kept_seqs = keep.any(dim=1).float()
        rewards = batch["rewards"].float()
        n_seqs = torch.tensor(float(keep.size(0)), device=keep.device)
        n_kept = kept_seqs.sum()
        metrics = {
            "reward": (rewards.sum(), n_seqs),
            "acceptance_rate": (n_kept, n_seqs),
            "kept_reward": ((rewards * kept_seqs.to(rewards.device)).sum(), n_kept),
            "completion_length": (completion.sum().float(), n_seqs),
            "kept_length": (keep.sum().float(), n_kept),
            **{k: (v.float().sum(), n_seqs) for k, v in batch.items() if k.startswith("reward/")},
        }
        return LossOutput(sum=nll_sum, count=self.count(batch).to(nll_sum.device), metrics=metrics)
