"""The ``pairwise`` selection: which sample of each prompt's group is chosen and which rejected.

For online DPO (loss ``online_dpo``), the rollout data samples ``G`` completions per
prompt (``num_generations: 2`` is TRL's online DPO) and this advantage part, which sees
each group, marks the highest-reward completion as chosen (``+1.0`` on its tokens) and
the lowest as rejected (``-1.0``); the others get 0 and the loss ignores them.

Ties follow TRL 1.16's ``OnlineDPOTrainer.training_step`` (``mask = first_half >=
second_half``: on equal rewards the first sample is chosen) unless ``ties: skip``, which
drops a pair whose two rewards are equal (the loss then trains on nothing for it).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from aligntk import ComponentConfig

from .protocols import Scored

Ties = Literal["first", "skip"]


def pairwise_choice(rewards: torch.Tensor, ties: Ties = "first") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chosen and the rejected completion of each group.

    Args:
        rewards: ``[P, G]``, ``G >= 2`` completions for each of ``P`` prompts.
        ties: ``first``: equal rewards still make a pair (the highest with the earliest
            index is chosen, the lowest with the latest index rejected: for ``G = 2``
            sample 0 is chosen on a tie, as TRL); ``skip``: a group whose best and worst
            rewards are equal makes no pair.

    Returns:
        ``(chosen [P], rejected [P], paired [P] bool)``: indices into each group, and
        whether the group makes a pair.
    """
    if rewards.size(1) < 2:
        raise ValueError("a pairwise choice needs at least 2 completions per prompt (data.num_generations: 2)")
    order = torch.sort(rewards, dim=1, descending=True, stable=True).indices
    chosen, rejected = order[:, 0], order[:, -1]
    rows = torch.arange(rewards.size(0), device=rewards.device)
    paired = torch.ones_like(chosen, dtype=torch.bool)
    if ties == "skip":
        paired = rewards[rows, chosen] > rewards[rows, rejected]
    return chosen, rejected, paired


class PairwiseConfig(ComponentConfig):
    """Options of the ``pairwise`` advantage.

    Attributes:
        ties: ``first`` (TRL: on equal rewards the earlier sample is chosen) or ``skip``
            (a pair with equal rewards is not trained on).
    """

    ties: Ties = "first"


class PairwiseSelection:
    """Advantage ``+1.0`` on the chosen completion's tokens, ``-1.0`` on the rejected one's, 0 elsewhere."""

    Config = PairwiseConfig
    needs_values: ClassVar[bool] = False

    def __init__(self, config: PairwiseConfig):
        self.config = config

    def __call__(self, scored: Scored) -> tuple[torch.Tensor, None]:
        grouped = scored.rewards.view(-1, scored.group_size)
        chosen, rejected, paired = pairwise_choice(grouped, self.config.ties)
        sign = torch.zeros_like(grouped, dtype=scored.mask.dtype)
        rows = torch.arange(grouped.size(0), device=grouped.device)
        sign[rows, chosen] = paired.to(sign.dtype)
        sign[rows, rejected] = -paired.to(sign.dtype)
        return sign.reshape(-1, 1) * scored.mask, None
