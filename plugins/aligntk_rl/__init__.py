"""Online policy optimization as a loss: rollouts from the current policy, GRPO / PPO-clip, best-of-N.

Registers data ``rollout``; losses ``grpo``, ``ppo`` (with a learned value head) and
``best_of_n`` (rejection-sampling fine-tuning); rewards ``exact_answer``, ``choice``
(the answer read out of free text) and ``reward_model`` (a model trained with the
``reward_model`` loss); and parts (``aligntk_register_parts``) of four kinds it defines
(protocols in ``aligntk_rl.protocols`` and ``aligntk_rl.variants``): advantage estimators ``group``,
``rloo``, ``gae`` and ``best_of_n`` (a selection); KL estimators ``k1``, ``k2``, ``k3``;
aggregations ``token``, ``sequence`` and ``fixed_length``; policy surrogates ``clip``,
``cispo`` and ``sapo``; generators (``aligntk_rl.generators``) ``hf`` (the policy's
``generate``, the default) and ``vllm`` (a colocated vLLM engine fed the policy's weights
after every optimizer step). Every online method picks them by name, and methods compare
under the same ones; another plugin adds its own by registering a part of the same kind.
Also: loss ``online_dpo`` with the advantage ``pairwise`` (online DPO), and data and loss
``gkd`` (on-policy distillation from a frozen teacher).
"""

from __future__ import annotations

from aligntk import Register, RegisterPart, hookimpl

from . import estimators as est
from . import variants
from .best_of_n import BestOfNLoss, BestOfNSelection
from .data import RolloutData
from .generators import Generator, HFGenerator, Samples, VLLMGenerator
from .gkd import GKDData, GKDLoss
from .loss import GRPOLoss, PPOLoss
from .online_dpo import OnlineDPOLoss
from .pairwise import PairwiseSelection
from .protocols import AdvantageEstimator, Aggregation, KLEstimator, Scored
from .rewards import ChoiceAnswer, ExactAnswer, RewardModelScore
from .variants import Surrogate

__all__ = [
    "AdvantageEstimator",
    "Aggregation",
    "BestOfNLoss",
    "BestOfNSelection",
    "ChoiceAnswer",
    "ExactAnswer",
    "GKDData",
    "GKDLoss",
    "GRPOLoss",
    "Generator",
    "HFGenerator",
    "KLEstimator",
    "OnlineDPOLoss",
    "PPOLoss",
    "PairwiseSelection",
    "RewardModelScore",
    "RolloutData",
    "Samples",
    "Scored",
    "Surrogate",
    "VLLMGenerator",
]


@hookimpl
def aligntk_register_data(register: Register) -> None:
    register("rollout", RolloutData)
    register("gkd", GKDData)


@hookimpl
def aligntk_register_losses(register: Register) -> None:
    register("grpo", GRPOLoss)
    register("ppo", PPOLoss)
    register("best_of_n", BestOfNLoss)
    register("online_dpo", OnlineDPOLoss)
    register("gkd", GKDLoss)


@hookimpl
def aligntk_register_rewards(register: Register) -> None:
    register("exact_answer", ExactAnswer)
    register("choice", ChoiceAnswer)
    register("reward_model", RewardModelScore)


@hookimpl
def aligntk_register_parts(register: RegisterPart) -> None:
    register("advantage", "group", est.GroupAdvantage)
    register("advantage", "rloo", est.RLOOAdvantage)
    register("advantage", "gae", est.GAEAdvantage)
    register("advantage", "best_of_n", BestOfNSelection)
    register("advantage", "pairwise", PairwiseSelection)
    register("kl", "k1", est.K1)
    register("kl", "k2", est.K2)
    register("kl", "k3", est.K3)
    register("aggregation", "token", est.TokenMean)
    register("aggregation", "sequence", est.SequenceMean)
    register("aggregation", "fixed_length", est.FixedLength)
    register("surrogate", "clip", variants.ClipSurrogate)
    register("surrogate", "cispo", variants.CISPOSurrogate)
    register("surrogate", "sapo", variants.SAPOSurrogate)
    register("generator", "hf", HFGenerator)
    register("generator", "vllm", VLLMGenerator)
