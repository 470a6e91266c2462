"""Unpaired preference losses: ``kto`` (KTO, unpaired APO-zero) and ``bco`` (BCO), on the
``unpaired_preference`` data.

Both count examples (one prompt with one completion, desirable or not). Each has a statistic
over the batch: KTO's KL reference point is the mean over the batch's mismatched pairs, and
BCO's reward shift is a running mean that every training batch updates. So both take the whole
batch in one micro-batch (``whole_batch``: ``train.grad_accum: 1``, one process), which makes
them equal to TRL's value for the same batch. BCO's optional underlying-distribution matching
(``udm``) weights the undesirable rows by a density ratio of their prompts (``aligntk_po.udm``).

The tensor math is in the pure functions ``kto_loss``, ``bco_loss`` and ``running_mean_update``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from aligntk import IGNORE_INDEX, Batch, Example, LossCapabilities, LossContext, LossOutput, Models, RecipeError, token_logps

from .loss import ChunkedConfig
from .losses import up
from .udm import KEY as UDM_KEY
from .udm import DensityRatio, PromptEmbedder, UDMConfig
from .unpaired import UNPAIRED_FIELDS

KTOLossType = Literal["kto", "apo_zero_unpaired"]


# --------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------


def kto_reference_point(kl_policy: torch.Tensor, kl_reference: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0``: the batch mean of ``log π(y'|x) - log π_ref(y'|x)`` over the
    mismatched pairs, detached and clamped at 0 (as TRL).

    Args:
        kl_policy, kl_reference: ``[B]`` sequence log-probs of the mismatched (KL) rows.

    Returns:
        a scalar.
    """
    return (up(kl_policy) - up(kl_reference)).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: KTOLossType = "kto",
) -> torch.Tensor:
    """Per-example KTO loss (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, eq. 7), as TRL's
    ``KTOTrainer``.

    With ``u = policy_logps - ref_logps`` and reference point ``z0 = kl``:

    * ``kto``: desirable ``λ_D (1 - σ(β (u - z0)))``, undesirable ``λ_U (1 - σ(β (z0 - u)))``;
    * ``apo_zero_unpaired`` (APO-zero, https://arxiv.org/abs/2408.06266, unpaired): desirable
      ``λ_D (1 - σ(β u))``, undesirable ``λ_U σ(β u)`` (no reference point).

    Args:
        policy_logps, ref_logps: ``[B]`` sequence log-probs of each completion.
        desirable: ``[B]`` bool, the label.
        kl: the reference point (``kto_reference_point``); unused by ``apo_zero_unpaired``.
        beta: the KL coefficient.
        desirable_weight, undesirable_weight: ``λ_D`` and ``λ_U``.
        loss_type: ``kto`` or ``apo_zero_unpaired``.

    Returns:
        ``[B]`` per-example losses, in the input order.
    """
    u = up(policy_logps) - up(ref_logps)
    if loss_type == "kto":
        chosen = 1 - torch.sigmoid(beta * (u - kl))
        rejected = 1 - torch.sigmoid(beta * (kl - u))
    elif loss_type == "apo_zero_unpaired":
        chosen = 1 - torch.sigmoid(beta * u)
        rejected = torch.sigmoid(beta * u)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of kto, apo_zero_unpaired")
    return torch.where(desirable, desirable_weight * chosen, undesirable_weight * rejected)


def running_mean_update(mean: float, count: float, values: torch.Tensor) -> tuple[float, float]:
    """The running mean of every value seen so far, after ``values`` (TRL's ``RunningMoments.update``).

    Args:
        mean, count: the running mean and how many values it covers (TRL starts at 0 and 1e-24).
        values: ``[N]`` the new values.

    Returns:
        ``(mean, count)`` after them.
    """
    n = values.numel()
    batch_mean = float(values.detach().double().mean())
    total = count + n
    return mean + (batch_mean - mean) * n / total, total


def bco_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    delta: torch.Tensor | float,
    beta: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example BCO loss (Jung et al. 2024, https://arxiv.org/abs/2404.04656, eq. 8), as TRL's
    ``BCOTrainer.bco_loss``: a binary classifier on the implicit reward ``r = β u`` shifted by
    ``δ``: desirable ``-log σ(r - δ)``, undesirable ``-log σ(-(r - δ))``, each times its UDM
    weight when there is one (TRL gives the desirable rows weight 1).

    Args:
        policy_logps, ref_logps: ``[B]`` sequence log-probs of each completion.
        desirable: ``[B]`` bool, the label.
        delta: the reward shift, the running mean of the rewards (``running_mean_update``).
        beta: the KL coefficient.
        weight: ``[B]`` per-example weights (UDM's density ratios, ``aligntk_po.udm``), or ``None``.

    Returns:
        ``[B]`` per-example losses, in the input order.
    """
    r = beta * (up(policy_logps) - up(ref_logps))
    losses = torch.where(desirable, -F.logsigmoid(r - delta), -F.logsigmoid(-(r - delta)))
    return losses if weight is None else losses * weight.to(losses.dtype)


# --------------------------------------------------------------------------------------
# Shared by the components
# --------------------------------------------------------------------------------------


def _logps(model: torch.nn.Module, batch: Batch, prefix: str, chunk_size: int | str) -> torch.Tensor:
    """``[B]`` summed completion log-probs of the ``{prefix}input_ids`` rows under ``model``."""
    return token_logps(
        model,
        batch[f"{prefix}input_ids"],
        batch[f"{prefix}attention_mask"],
        labels=batch[f"{prefix}labels"],
        chunk_size=chunk_size,
    ).logps.sum(-1)


def _examples(batch: Batch) -> torch.Tensor:
    return torch.tensor(batch["input_ids"].shape[0], device=batch["input_ids"].device)


def _unpaired_metrics(
    rewards: torch.Tensor, desirable: torch.Tensor
) -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """Rewards of the desirable and undesirable completions, each averaged over its own rows."""
    rewards = rewards.detach()
    d = desirable.float()
    return {
        "rewards/chosen": ((rewards * d).sum(), d.sum()),
        "rewards/rejected": ((rewards * (1 - d)).sum(), (1 - d).sum()),
    }


class UnpairedConfig(ChunkedConfig):
    """Options the unpaired losses share.

    Attributes:
        beta: the KL coefficient.
        reference: ``cached`` computes the reference log-probs of the matched rows once per
            example (KTO's mismatched rows depend on the batch, so the reference still scores
            those live); ``live`` runs the reference for everything in every step.
        chunk_size: see ``ChunkedConfig``.
    """

    beta: float = Field(0.1, gt=0)
    reference: Literal["cached", "live"] = "cached"


class _Unpaired:
    requires = UNPAIRED_FIELDS
    roles = ("policy", "reference")
    config: UnpairedConfig

    def precompute(self, models: Models, batch: Batch) -> dict[str, torch.Tensor]:
        return {"ref_logps": _logps(models["reference"], batch, "", self.config.chunk_size)}

    def count(self, batch: Batch) -> torch.Tensor:
        return _examples(batch)

    def _ref_logps(self, models: Models, batch: Batch) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        return _logps(models["reference"], batch, "", self.config.chunk_size)


# --------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------


class KTOConfig(UnpairedConfig):
    """Options of the ``kto`` loss (TRL 1.16 ``KTOConfig``'s defaults; with ``beta``, ``reference``, ``chunk_size``).

    Attributes:
        loss_type: ``kto`` or ``apo_zero_unpaired`` (no reference point, so no mismatched rows).
        desirable_weight, undesirable_weight: ``λ_D`` and ``λ_U``; with unbalanced data the KTO
            paper keeps ``λ_D n_D / (λ_U n_U)`` in ``[1, 4/3]``.
    """

    loss_type: KTOLossType = "kto"
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)


class KTOLoss(_Unpaired):
    """Kahneman–Tversky optimization on unpaired desirable/undesirable completions."""

    Config = KTOConfig

    @classmethod
    def capabilities(cls, config: KTOConfig) -> LossCapabilities:
        kl = config.loss_type == "kto"
        cached = config.reference == "cached"
        # The mismatched rows are paired inside each batch: their reference log-probs stay live.
        live = None if kl or not cached else ("policy",)
        return LossCapabilities(precompute=cached, live_roles=live, whole_batch=kl)

    def __init__(self, config: KTOConfig):
        self.config = config

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        c = self.config
        policy = _logps(models.policy, batch, "", c.chunk_size)
        ref = self._ref_logps(models, batch)
        desirable = batch["label"].bool()
        metrics = _unpaired_metrics(c.beta * (policy - ref), desirable)
        kl: torch.Tensor | float = 0.0
        if c.loss_type == "kto":
            with torch.no_grad():  # z0 is a constant of the step, as in TRL
                kl = kto_reference_point(
                    _logps(models.policy, batch, "kl_", c.chunk_size),
                    _logps(models["reference"], batch, "kl_", c.chunk_size),
                )
            metrics["kl"] = kl * desirable.numel()
        losses = kto_loss(policy, ref, desirable, kl, c.beta, c.desirable_weight, c.undesirable_weight, c.loss_type)
        return LossOutput(sum=losses.sum(), count=_examples(batch), metrics=metrics)


# --------------------------------------------------------------------------------------
# BCO
# --------------------------------------------------------------------------------------


class RunningMean(torch.nn.Module):
    """BCO's reward shift ``δ``: the running mean of every training reward so far.

    Its two buffers live in the policy as a trainable head without parameters, so a checkpoint
    holds them and ``--resume`` goes on with the same ``δ`` (when the whole model is trained;
    an adapter or partly frozen run checkpoints only trained parameters, and a resumed one
    starts ``δ`` again from 0: see docs/methods.md).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.full((), 1e-24, dtype=torch.float64))  # TRL's start

    @torch.no_grad()
    def update(self, values: torch.Tensor) -> None:
        mean, count = running_mean_update(float(self.mean), float(self.count), values)
        self.mean.fill_(mean)
        self.count.fill_(count)


class BCOConfig(UnpairedConfig):
    """Options of the ``bco`` loss (TRL's ``BCOConfig`` defaults: ``beta`` 0.1; with ``reference``,
    ``chunk_size``).

    Attributes:
        udm: underlying-distribution matching (off by default): each undesirable row's loss is
            weighted by the density ratio ``p_D(x) / p_U(x)`` of its prompt, estimated once per
            example (before training, cached with the reference log-probs) by scikit-learn's
            ``LogisticRegression`` on prompt embeddings, as TRL's ``BCOTrainer`` with an
            ``embedding_func``; desirable rows keep weight 1. The embedding is the mean of an
            encoder's last hidden state over the prompt's tokens: ``{embedding_model: FOLDER,
            prompt_sample_size: 1024, min_density_ratio: 0.5, max_density_ratio: 10.0,
            batch_size: 32}`` (see ``aligntk_po.udm.UDMConfig``; needs ``aligntk[bco-udm]``).
    """

    udm: UDMConfig | None = None


class BCOLoss(_Unpaired):
    """Binary classifier optimization: desirable vs undesirable by the implicit reward, shifted by its running mean."""

    Config = BCOConfig

    @classmethod
    def capabilities(cls, config: BCOConfig) -> LossCapabilities:
        cached = config.reference == "cached"
        return LossCapabilities(
            precompute=cached or config.udm is not None,
            live_roles=("policy",) if cached else None,
            whole_batch=True,
            heads=True,
            setup=config.udm is not None,
        )

    def __init__(self, config: BCOConfig):
        self.config = config
        self.running = RunningMean()
        self.udm: DensityRatio | None = None
        self._tokenizer: Any = None

    def heads(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        return {"bco_running_mean": self.running}

    def setup(self, ctx: LossContext) -> None:
        """Fit UDM's classifier on the training prompts, before ``precompute`` (the engine calls it with ``udm``).

        The prompts are the examples' ``prompt_ids`` decoded with the run's tokenizer (special
        tokens skipped), then embedded by ``udm.embedding_model``.

        Raises:
            RecipeError: the embedding model cannot be loaded, or scikit-learn is missing.
            DataError: the training data has no desirable or no undesirable row.
        """
        c = self.config.udm
        if c is None:
            return
        self._tokenizer = ctx.tokenizer
        self.udm = DensityRatio(c, PromptEmbedder(c.embedding_model, c.batch_size))
        train = ctx.splits.train
        prompts = [self._decode(e["prompt_ids"]) for e in train]
        self.udm.fit(prompts, [bool(e["label"]) for e in train], ctx.seed)

    def precompute(self, models: Models, batch: Batch) -> dict[str, torch.Tensor]:
        fields = super().precompute(models, batch) if self.config.reference == "cached" else {}
        if self.config.udm is not None:
            fields["udm_weight"] = self._udm_weight(batch)
        return fields

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def _udm_weight(self, batch: Batch) -> torch.Tensor:
        """``[B]`` UDM weights of the batch's rows, from their prompts (the unlabelled, unpadded tokens)."""
        if self.udm is None:
            raise RecipeError(
                f"{UDM_KEY}: the density-ratio classifier is not fit: call the loss's setup(LossContext) "
                "first (the engine does, before precompute)"
            )
        prompt = (batch["labels"] == IGNORE_INDEX) & batch["attention_mask"].bool()
        prompts = [self._decode(row[keep].tolist()) for row, keep in zip(batch["input_ids"], prompt)]
        device = batch["input_ids"].device
        with torch.autocast(device.type, enabled=False):  # the same embeddings as when fitting
            self.udm.embed.model.to(device)
            return self.udm.weights(prompts, batch["label"]).to(device)

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        c = self.config
        running = models.heads.get("bco_running_mean", self.running)
        policy = _logps(models.policy, batch, "", c.chunk_size)
        ref = self._ref_logps(models, batch)
        rewards = c.beta * (up(policy) - up(ref))
        if models.policy.training:  # evaluation reads delta without moving it, as TRL's prediction_step
            running.update(rewards)
        delta = running.mean.to(rewards.dtype)
        desirable = batch["label"].bool()
        weight = None
        if c.udm is not None:
            weight = batch["udm_weight"] if "udm_weight" in batch else self._udm_weight(batch)
        losses = bco_loss(policy, ref, desirable, delta, c.beta, weight)
        metrics = _unpaired_metrics(rewards, desirable)
        metrics["delta"] = delta.detach() * desirable.numel()
        if weight is not None:  # the weighted (undesirable) rows' mean weight
            undesirable = (~desirable).float()
            metrics["udm_weight"] = ((weight.detach().float() * undesirable).sum(), undesirable.sum())
        return LossOutput(sum=losses.sum(), count=_examples(batch), metrics=metrics)
