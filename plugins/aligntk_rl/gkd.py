"""Generalized knowledge distillation (GKD): the teacher scores the student's own samples.

Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", https://arxiv.org/abs/2306.13649; TRL 1.16's
``trl.experimental.gkd``. Two registered pieces:

* data ``gkd``: prompts with their dataset completions. For each training micro-batch,
  with probability ``lmbda`` the student (the policy) samples the completions itself
  (on-policy), else the dataset's completions are used, or, with ``seq_kd``, the
  teacher's samples (TRL's ``GKDTrainer.training_step``: one draw per micro-batch).
* loss ``gkd``: the generalized Jensen-Shannon divergence between the teacher's and the
  student's next-token distributions on every completion token, summed; the engine
  divides by the completion-token count over the global batch (TRL's
  ``num_items_in_batch`` normalization). It needs a frozen ``teacher`` model role
  sharing the policy's vocabulary (``models: {teacher: {path: ...}}``).

The loss also works on the ``rollout`` data (always on-policy, ``lmbda = 1``), which
needs a reward only to log it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from aligntk import (
    IGNORE_INDEX,
    Batch,
    ComponentConfig,
    DataCapabilities,
    DataContext,
    DataError,
    DataReport,
    DataSplits,
    Example,
    FileDataConfig,
    LossOutput,
    Models,
    load_splits,
    pad_tokens,
    part,
    require_pad_token,
    sample_seed,
    token_divergence,
    unwrap,
)

from .generators import Generator, HFGenerator, completion_seeds

# --------------------------------------------------------------------------------------
# The divergence
# --------------------------------------------------------------------------------------


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """GKD's generalized JSD per position (eq. 1), with TRL's convention for ``beta``.

    ``JSD_beta = beta KL(teacher || m) + (1 - beta) KL(student || m)`` with the mixture
    ``m = beta teacher + (1 - beta) student``; ``beta = 0`` is ``KL(teacher || student)``
    (forward KL), ``beta = 1`` ``KL(student || teacher)`` (reverse KL), as TRL's
    ``GKDTrainer.generalized_jsd_loss``. Logits are upcast to float32 and divided by
    ``temperature`` before the softmax (no ``temperature**2`` factor, as TRL).

    Args:
        student_logits, teacher_logits: ``[..., V]``.

    Returns:
        ``[...]``: the divergence at each position.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kind = "forward_kl" if beta == 0 else "reverse_kl" if beta == 1 else "jsd"
    return token_divergence(student, teacher, kind, beta)


# --------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------


class GKDLossConfig(ComponentConfig):
    """Options of the ``gkd`` loss (defaults: TRL 1.16's ``GKDConfig`` and ``generalized_jsd_loss``).

    Attributes:
        beta: the JSD interpolation weight: 0 forward KL, 1 reverse KL (TRL ``0.5``).
        temperature: divides both logits before the softmax. TRL's ``compute_loss`` never
            passes its ``temperature`` (that one is the sampling temperature, the ``gkd``
            data's option), so TRL's loss always uses 1.0.
    """

    beta: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(1.0, gt=0)


class GKDLoss:
    """Generalized JSD from a frozen teacher on the completion tokens, summed; the engine divides by their count."""

    Config = GKDLossConfig
    requires = frozenset({"input_ids", "attention_mask", "labels"})
    roles = ("policy", "teacher")

    def __init__(self, config: GKDLossConfig):
        self.config = config

    def count(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def __call__(self, models: Models, batch: Batch) -> LossOutput:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        with torch.no_grad():
            teacher_logits = models["teacher"](**inputs).logits
        student_logits = models.policy(**inputs).logits
        if teacher_logits.size(-1) != student_logits.size(-1):
            raise ValueError(
                f"gkd: teacher vocabulary {teacher_logits.size(-1)} != policy vocabulary {student_logits.size(-1)}"
            )
        # position t predicts token t + 1; only completion tokens count (TRL's shifted labels)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        jsd = generalized_jsd(
            student_logits[:, :-1][mask], teacher_logits[:, :-1][mask], self.config.beta, self.config.temperature
        )
        loss_sum = jsd.sum()
        n_tokens = mask.sum()
        n_seqs = torch.tensor(float(mask.size(0)), device=loss_sum.device)
        metrics: dict[str, Any] = {"completion_length": (n_tokens.float(), n_seqs)}
        if "on_policy" in batch:
            metrics["on_policy_fraction"] = (batch["on_policy"].float().sum(), n_seqs)
        if "rewards" in batch:
            metrics["reward"] = (batch["rewards"].float().sum(), n_seqs)
        return LossOutput(sum=loss_sum, count=n_tokens, metrics=metrics)


# --------------------------------------------------------------------------------------
# The data: dataset completions mixed with the student's own samples
# --------------------------------------------------------------------------------------


class GKDDataConfig(FileDataConfig):
    """Options of the ``gkd`` data (with ``eval_path``, ``eval_fraction``, ``max_unk_fraction``).

    Defaults are TRL 1.16's ``GKDConfig``.

    Attributes:
        path: rows with ``prompt`` and ``completion`` (the dataset's answer, also the
            reference evaluators compare with).
        lmbda: the probability that a micro-batch's completions are the student's own
            samples (TRL ``0.5``; 1: always on-policy, 0: the dataset's, supervised KD).
        seq_kd: off-policy micro-batches use the teacher's samples instead of the
            dataset's completions (sequence-level KD; TRL ``false``).
        max_new_tokens, temperature, top_p: sampling (TRL ``128``, ``0.9``, ``1.0``).
        generator: a registered generator for the student's samples: ``hf`` or ``vllm``
            (the ``rollout`` data's; the teacher's, with ``seq_kd``, are always ``hf``).
    """

    prompt_key: str = "prompt"
    completion_key: str = "completion"
    lmbda: float = Field(0.5, ge=0, le=1)
    seq_kd: bool = False
    max_new_tokens: PositiveInt = 128
    temperature: float = Field(0.9, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    generator: part("generator") = "hf"

    not_encoding = FileDataConfig.not_encoding | {
        "lmbda", "seq_kd", "max_new_tokens", "temperature", "top_p", "generator"
    }


def _uniform(examples: Sequence[Example]) -> float:
    """A uniform draw in ``[0, 1)`` for a micro-batch: from its first example's ``sample_seed``, else torch's generator."""
    if examples and "sample_seed" in examples[0]:
        generator = torch.Generator().manual_seed(sample_seed(examples[0]["sample_seed"], -1))
        return torch.rand((), generator=generator).item()
    return torch.rand(()).item()


class GKDData:
    """Prompts with dataset completions; each micro-batch is on-policy with probability ``lmbda``."""

    Config = GKDDataConfig
    provides = frozenset({"input_ids", "attention_mask", "labels", "on_policy"})

    @classmethod
    def capabilities(cls, config: GKDDataConfig) -> DataCapabilities:
        return DataCapabilities(online=True, example_fields=frozenset({"prompt", "prompt_ids", "reference"}))

    def __init__(self, config: GKDDataConfig):
        self.config = config
        self.generator = config.generator.build()
        self.teacher_generator = HFGenerator(HFGenerator.Config())

    def load(self, ctx: DataContext) -> DataSplits:
        require_pad_token(ctx.tokenizer)
        self.tokenizer = ctx.tokenizer
        tok, c = ctx.tokenizer, self.config

        def encode(where: str, row: dict[str, Any], report: DataReport) -> Example:
            prompt, completion = row.get(c.prompt_key), row.get(c.completion_key)
            if not isinstance(prompt, str) or not prompt:
                raise DataError(f"{where}: expected a non-empty string under {c.prompt_key!r}")
            if not isinstance(completion, str):
                raise DataError(f"{where}: expected a string under {c.completion_key!r}")
            ids = tok(completion, add_special_tokens=False)["input_ids"]
            if tok.eos_token_id is not None:
                ids = ids + [tok.eos_token_id]  # the student learns to stop, as in SFT
            prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
            return {"prompt": prompt, "prompt_ids": prompt_ids, "reference": completion, "completion_ids": ids}

        return load_splits(c, ctx.seed, encode=encode, tokenizer=tok)

    def rollout(self, models: Models, examples: Sequence[Example]) -> list[Example]:
        c = self.config
        # TRL draws random.random() <= lmbda once per training step (micro-batch). The draw is
        # seeded by the micro-batch's first example (its sample_seed from the engine), so it is
        # the same on any process count and on resume; without one, torch's generator (the run's).
        on_policy = _uniform(examples) < c.lmbda  # [0, 1): lmbda 1 always, 0 never
        if on_policy:
            completions = self._sample(self.generator, models.policy, examples)
        elif c.seq_kd:
            completions = self._sample(self.teacher_generator, models["teacher"], examples)
        else:
            completions = [list(e["completion_ids"]) for e in examples]
        return [
            {
                "input_ids": e["prompt_ids"] + comp,
                "labels": [IGNORE_INDEX] * len(e["prompt_ids"]) + comp,
                "on_policy": on_policy,
            }
            for e, comp in zip(examples, completions)
        ]

    def _sample(self, generator: Generator, model: torch.nn.Module, examples: Sequence[Example]) -> list[list[int]]:
        prompts = [e["prompt_ids"] for e in examples]
        seeds = completion_seeds(examples, 1)
        return generator.sample(unwrap(model), self.tokenizer, prompts, self.config, seeds=seeds).completions

    def collate(self, examples: Sequence[Example]) -> Batch:
        """``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` (right-padded) and ``on_policy`` ``[B]`` bool."""
        batch = pad_tokens([e["input_ids"] for e in examples], self.tokenizer.pad_token_id,
                           [e["labels"] for e in examples])
        batch["on_policy"] = torch.tensor([bool(e.get("on_policy", False)) for e in examples])
        return batch


