"""The parts this plugin defines, as protocols: advantage estimators, KL estimators, aggregations.

They are registered with ``aligntk_register_parts`` under the kinds ``advantage``, ``kl``
and ``aggregation``, and chosen in a component's options with ``aligntk.part(kind)``:
``advantage: part("advantage") = "group"``. Another plugin adds its own estimator by
registering a class that follows the protocol under the same kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch

from aligntk import ComponentConfig


@dataclass
class Scored:
    """Sampled completions with their scores, as an advantage estimator sees them.

    Every tensor is ``[N, T]`` and aligned with the token ids: position ``t`` holds the
    log-probability (or value) of token ``t`` given those before it.

    Attributes:
        rewards: ``[N]`` one scalar reward per completion.
        group_size: completions per prompt; rows ``[k * G, (k + 1) * G)`` share a prompt.
        mask: 1.0 on completion tokens, 0.0 on prompt and padding.
        logps: the policy's token log-probs at sampling time, or ``None`` when the data did
            not record them (one optimizer step per rollout and no value head).
        ref_logps: the reference's token log-probs, or ``None`` when there is no reference.
        values: the value head's estimate before each token, or ``None`` without one.
    """

    rewards: torch.Tensor
    group_size: int
    mask: torch.Tensor
    logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    values: torch.Tensor | None = None


@runtime_checkable
class AdvantageEstimator(Protocol):
    """Turns scored samples into per-token advantages ``[N, T]`` (0 off the mask).

    Returns ``(advantages, returns)``; ``returns`` (the value head's regression
    target, ``[N, T]``) is ``None`` for estimators without a learned value.
    ``needs_values`` tells the data component to run the value head at sampling time.
    """

    Config: ClassVar[type[ComponentConfig]]
    needs_values: ClassVar[bool]

    def __call__(self, scored: Scored) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@runtime_checkable
class KLEstimator(Protocol):
    """Per-token estimate of ``KL(policy || reference)`` from log-probs ``[B, T]`` each."""

    Config: ClassVar[type[ComponentConfig]]

    def __call__(self, logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Aggregation(Protocol):
    """Reduces a per-token loss ``[B, T]`` under a 0/1 ``mask`` to a sum over units.

    ``count(mask)`` is the number of units the sum is over (tokens, sequences); the
    engine divides the sum by the count over the whole global batch.
    """

    Config: ClassVar[type[ComponentConfig]]

    def __call__(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def count(self, mask: torch.Tensor) -> torch.Tensor: ...
