"""Online policy optimization as a loss: rollouts from the current policy, GRPO / PPO-clip.

Registers data ``rollout``; losses ``grpo`` and ``ppo`` (with a learned value head);
rewards ``exact_answer`` and ``reward_model`` (a model trained with the
``reward_model`` loss); advantage estimators ``group``, ``rloo`` and ``gae``; KL
estimators ``k1``, ``k2``, ``k3``; aggregations ``token``, ``sequence`` and
``fixed_length``. The estimators and aggregations are components of their own, so
every online method picks them by name and methods compare under the same ones.
"""

from __future__ import annotations

from aligntk import hookimpl
from aligntk.hookspecs import Register

from . import estimators as est
from .data import RolloutData
from .loss import GRPOLoss, PPOLoss
from .rewards import ExactAnswer, RewardModelScore

__all__ = ["ExactAnswer", "GRPOLoss", "PPOLoss", "RewardModelScore", "RolloutData"]


@hookimpl
def aligntk_register_data(register: Register) -> None:
    register("rollout", RolloutData)


@hookimpl
def aligntk_register_losses(register: Register) -> None:
    register("grpo", GRPOLoss)
    register("ppo", PPOLoss)


@hookimpl
def aligntk_register_rewards(register: Register) -> None:
    register("exact_answer", ExactAnswer)
    register("reward_model", RewardModelScore)


@hookimpl
def aligntk_register_advantages(register: Register) -> None:
    register("group", est.GroupAdvantage)
    register("rloo", est.RLOOAdvantage)
    register("gae", est.GAEAdvantage)


@hookimpl
def aligntk_register_kl_estimators(register: Register) -> None:
    register("k1", est.K1)
    register("k2", est.K2)
    register("k3", est.K3)


@hookimpl
def aligntk_register_aggregations(register: Register) -> None:
    register("token", est.TokenMean)
    register("sequence", est.SequenceMean)
    register("fixed_length", est.FixedLength)
