"""Online policy optimization as a loss: rollouts from the current policy, GRPO / PPO-clip.

Registers data ``rollout``, loss ``grpo`` and rewards ``exact_answer`` and
``reward_model`` (a model trained with the ``reward_model`` loss). The advantage
and KL estimators in ``estimators`` are shared by every online loss.
"""

from __future__ import annotations

from aligntk import hookimpl
from aligntk.hookspecs import Register

from .data import RolloutData
from .loss import GRPOLoss
from .rewards import ExactAnswer, RewardModelScore

__all__ = ["ExactAnswer", "GRPOLoss", "RewardModelScore", "RolloutData"]


@hookimpl
def aligntk_register_data(register: Register) -> None:
    register("rollout", RolloutData)


@hookimpl
def aligntk_register_losses(register: Register) -> None:
    register("grpo", GRPOLoss)


@hookimpl
def aligntk_register_rewards(register: Register) -> None:
    register("exact_answer", ExactAnswer)
    register("reward_model", RewardModelScore)
