"""Online data: prompts whose completions are sampled from the current policy and scored."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field, PositiveInt

from aligntk import (
    IGNORE_INDEX,
    Batch,
    DataCapabilities,
    DataContext,
    DataError,
    DataReport,
    DataSplits,
    Example,
    FileDataConfig,
    Models,
    check_messages,
    load_splits,
    pad,
    pad_tokens,
    part,
    render_chat,
    require_pad_token,
    unwrap,
)

from .generators import completion_seeds, pad_logps, sampling_correction
from .loss import policy_forward
from .protocols import Scored


class RolloutConfig(FileDataConfig):
    """Options of the ``rollout`` data (with ``eval_path``, ``eval_fraction``, ``max_unk_fraction``).

    Attributes:
        path: prompts (JSONL/JSON/CSV/Parquet) with ``prompt`` and, for rule-based
            rewards, the reference answer under ``completion``.
        num_generations: completions sampled per prompt (the group ``G``).
        advantage: a registered advantage estimator: ``group`` (GRPO), ``rloo``
            (leave-one-out) or ``gae`` (PPO; needs the ``ppo`` loss's value head), with
            options as a mapping (``{name: gae, lam: 0.9}``).
        iterations: optimizer steps on each batch of rollouts before sampling again
            (PPO's epochs, GRPO's ``num_iterations``); the old log-probs are from sampling
            time, so the clipped ratio is right on every one. With 1 (and no value head)
            they are not recorded: the policy that trains is the one that sampled.
        generator: a registered generator: ``hf`` (the policy's ``generate``) or ``vllm``
            (a vLLM engine fed the policy's weights; its options in docs/rl.md). With a
            sampler other than the policy (vllm) the old log-probs are always recorded:
            the trainer's, with the truncated importance weight of the mismatch for the loss
            (``sampling/importance_ratio``, the generator's ``correction``), or, with
            ``correction: none``, the sampler's own.
    """

    prompt_key: str = "prompt"
    reference_key: str = "completion"
    num_generations: int = Field(4, ge=1)
    max_new_tokens: PositiveInt = 16
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    advantage: part("advantage") = "group"
    iterations: PositiveInt = 1
    generator: part("generator") = "hf"

    # Sampling and advantages happen after encoding: changing them keeps the tokenization cache.
    not_encoding = FileDataConfig.not_encoding | {
        "num_generations", "max_new_tokens", "temperature", "top_p", "advantage", "iterations", "generator"
    }


class RolloutData:
    """Samples ``G`` completions per prompt, scores them with the recipe's rewards, and
    records the token log-probs of the policy (old) and the reference at sampling time."""

    Config = RolloutConfig
    provides = frozenset(
        {"input_ids", "attention_mask", "labels", "old_logps", "ref_logps", "advantages", "rewards"}
        | {"old_values", "returns"}  # with a value-based estimator (gae)
        | {"sampling/logp_difference", "sampling/importance_ratio"}  # with a sampler other than the policy
    )

    @classmethod
    def capabilities(cls, config: RolloutConfig) -> DataCapabilities:
        return DataCapabilities(
            online=True, iterations=config.iterations, example_fields=frozenset({"prompt", "prompt_ids", "reference"})
        )

    def __init__(self, config: RolloutConfig):
        self.config = config
        self.advantage = config.advantage.build()
        self.generator = config.generator.build()

    def load(self, ctx: DataContext) -> DataSplits:
        if not ctx.rewards:
            raise DataError("rollout data needs rewards: add a 'rewards' list to the recipe")
        require_pad_token(ctx.tokenizer)
        self.tokenizer, self.rewards = ctx.tokenizer, ctx.rewards
        self.reward_names = _unique(ctx.reward_names or [_name_of(r) for _, r in ctx.rewards])
        encode = functools.partial(_encode_prompt, self.config.prompt_key, self.config.reference_key, ctx.tokenizer)
        return load_splits(self.config, ctx.seed, encode=encode, tokenizer=ctx.tokenizer)

    def rollout(self, models: Models, examples: Sequence[Example]) -> list[Example]:
        c, tok = self.config, self.tokenizer
        policy = unwrap(models.policy)
        device = next(policy.parameters()).device
        g = c.num_generations
        group = [e for e in examples for _ in range(g)]
        samples = self.generator.sample(policy, tok, [e["prompt_ids"] for e in group], c, seeds=completion_seeds(examples, g))
        completions = samples.completions
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        rewards = torch.zeros(len(group))
        parts: dict[str, torch.Tensor] = {}  # each reward's own scores, logged as reward/<name>
        for name, (weight, reward) in zip(self.reward_names, self.rewards):
            scores = reward([e["prompt"] for e in group], texts, references=[e["reference"] for e in group])
            scores = torch.as_tensor(scores, dtype=torch.float32).cpu().reshape(-1)
            if scores.numel() != len(group):
                raise DataError(f"reward {name!r}: returned {scores.numel()} scores for {len(group)} completions")
            parts[name] = scores
            rewards += weight * scores

        rows = [
            {"input_ids": e["prompt_ids"] + comp, "labels": [IGNORE_INDEX] * len(e["prompt_ids"]) + comp}
            for e, comp in zip(group, completions)
        ]
        batch = {k: v.to(device) for k, v in self.collate_tokens(rows).items()}
        value_head = self._value_head(models)
        mask = (batch["labels"] != IGNORE_INDEX).float()
        # With one optimizer step per rollout, no value head and the policy as the sampler,
        # the policy that trains on these rows is the one that sampled them: the loss takes
        # its own log-probs (detached) as the old ones, so the ratio is 1 and one forward
        # pass is saved, as in TRL with num_iterations 1. Otherwise the old log-probs are
        # recorded now: the trainer's, or (another sampler, no correction) the sampler's.
        sampler = None
        if samples.logps is not None:
            starts = [len(e["prompt_ids"]) for e in group]
            sampler = pad_logps(samples.logps, starts, batch["input_ids"].size(1)).to(device)
        correction = self.generator.correction if sampler is not None else None
        trainer = values = None
        if value_head is not None or correction is not None or (sampler is None and c.iterations > 1):
            sampled = policy_forward(policy, batch, value_head)
            trainer, values = sampled.logps, sampled.values
        old = trainer if sampler is None or correction is not None else sampler
        ref = policy_forward(models["reference"], batch).logps if "reference" in models else None
        scored = Scored(rewards=rewards.to(device), group_size=g, mask=mask, logps=old, ref_logps=ref, values=values)
        advantages, returns = self.advantage(scored)
        per_token = {"advantages": advantages}
        if sampler is not None and trainer is not None:
            # The sampler/trainer mismatch, logged as TRL's sampling_logp_difference (mean).
            per_token["sampling/logp_difference"] = (trainer - sampler).abs() * mask
        if correction is not None:  # the policy losses multiply their per-token surrogate by it, as TRL
            per_token["sampling/importance_ratio"] = sampling_correction(trainer, sampler, mask, correction)
        if old is not None:
            per_token["old_logps"] = old
        if ref is not None:
            per_token["ref_logps"] = ref
        if returns is not None:
            per_token.update(old_values=values, returns=returns)
        per_token = {k: v.float().cpu() for k, v in per_token.items()}
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            row.update({k: v[i, :n].tolist() for k, v in per_token.items()}, reward=float(rewards[i]))
            row["reward_parts"] = {name: float(v[i]) for name, v in parts.items()}
        return rows

    def _value_head(self, models: Models) -> torch.nn.Module | None:
        if not self.advantage.needs_values:
            return None
        head = models.heads.get("value")
        if head is None:
            raise DataError(
                f"advantage {self.config.advantage.name!r} needs a learned value: use the ppo loss, "
                "which trains a value head"
            )
        return head

    def collate_tokens(self, rows: Sequence[Example]) -> Batch:
        """``input_ids``, ``attention_mask`` and ``labels`` ``[B, T]``, right-padded (``aligntk.pad_tokens``)."""
        return pad_tokens([r["input_ids"] for r in rows], self.tokenizer.pad_token_id, [r["labels"] for r in rows])

    def collate(self, examples: Sequence[Example]) -> Batch:
        """The token fields, the per-token rollout fields ``[B, T]`` float32 (0 on padding), ``rewards`` ``[B]``
        (weighted sum) and each reward's own scores ``reward/<name>`` ``[B]``."""
        batch = self.collate_tokens(examples)
        width = batch["input_ids"].size(1)
        for name in ("old_logps", "ref_logps", "advantages", "old_values", "returns", *_SAMPLING):
            if name in examples[0]:
                batch[name] = pad([e[name] for e in examples], 0.0, width=width, dtype=torch.float32)
        batch["rewards"] = torch.tensor([e["reward"] for e in examples])
        for name in examples[0].get("reward_parts", {}):
            batch[f"reward/{name}"] = torch.tensor([e["reward_parts"][name] for e in examples])
        return batch


def _encode_prompt(prompt_key: str, reference_key: str, tokenizer: Any, where: str, row: dict[str, Any], report: DataReport) -> Example:
    """One prompt row to ``{"prompt", "prompt_ids", "reference"}``."""
    prompt = row.get(prompt_key)
    if isinstance(prompt, list):  # chat messages: rendered with the model's template and its generation cue
        messages = check_messages(prompt, where, prompt_key, expected="a string or a list of messages")
        if messages[-1]["role"] == "assistant":
            raise DataError(f"{where}: {prompt_key!r} must not end with an assistant message (the policy writes it)")
        text = render_chat(tokenizer, messages, where, generation_prompt=True)
        reference = row.get(reference_key, "")
        if not isinstance(reference, str):
            raise DataError(f"{where}: {reference_key!r} must be a string")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote the special tokens
        return {"prompt": text, "prompt_ids": ids, "reference": reference}
    if not isinstance(prompt, str) or not prompt:
        raise DataError(f"{where}: expected a non-empty string or a list of messages under {prompt_key!r}")
    reference = row.get(reference_key, "")
    if not isinstance(reference, str):
        raise DataError(f"{where}: {reference_key!r} must be a string")
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return {"prompt": prompt, "prompt_ids": ids, "reference": reference}


#: Per-token fields of a rollout from a sampler other than the policy (``[B, T]``, 0 off the completion).
_SAMPLING = ("sampling/logp_difference", "sampling/importance_ratio")


def _name_of(reward: Any) -> str:
    """A reward's name for metrics: a function's ``__name__``, else its class name."""
    return str(getattr(reward, "__name__", None) or type(reward).__name__)


def _unique(names: Sequence[str]) -> list[str]:
    """``names`` with repeats numbered (``ones``, ``ones_2``), so each reward logs under its own key."""
    out: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in out:
            n += 1
            candidate = f"{name}_{n}"
        out.append(candidate)
    return out
