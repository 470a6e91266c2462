"""Online data: prompts whose completions are sampled from the current policy and scored."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt

from aligntk import Batch, ComponentConfig, DataContext, DataError, DataReport, DataSplits, Example, LocalFile, Models
from aligntk.datafiles import read_rows, require_pad_token
from aligntk.generation import left_pad
from aligntk.models import unwrap

from .estimators import ADVANTAGES, token_logps


class RolloutConfig(ComponentConfig):
    """Options of the ``rollout`` data.

    Attributes:
        path: prompts (JSONL/JSON/CSV/Parquet) with ``prompt`` and, for rule-based
            rewards, the reference answer under ``completion``.
        num_generations: completions sampled per prompt (the group ``G``).
        advantage: ``group`` (GRPO) or ``rloo`` (leave-one-out).
    """

    path: LocalFile
    eval_path: LocalFile | None = None
    prompt_key: str = "prompt"
    reference_key: str = "completion"
    num_generations: int = Field(4, ge=1)
    max_new_tokens: PositiveInt = 16
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    advantage: Literal["group", "rloo"] = "group"


class RolloutData:
    """Samples ``G`` completions per prompt, scores them with the recipe's rewards, and
    records the token log-probs of the policy (old) and the reference at sampling time."""

    Config = RolloutConfig
    provides = frozenset(
        {"input_ids", "attention_mask", "labels", "old_logps", "ref_logps", "advantages", "rewards"}
    )

    def __init__(self, config: RolloutConfig):
        self.config = config

    def load(self, ctx: DataContext) -> DataSplits:
        if not ctx.rewards:
            raise DataError("rollout data needs rewards: add a 'rewards' list to the recipe")
        require_pad_token(ctx.tokenizer)
        self.tokenizer, self.rewards = ctx.tokenizer, ctx.rewards
        report = DataReport()
        train = self._read(self.config.path)
        evals = self._read(self.config.eval_path) if self.config.eval_path else []
        report.rows = {"train": len(train), "eval": len(evals)}
        return DataSplits(train=train, eval=evals, report=report)

    def _read(self, path: Any) -> list[Example]:
        c = self.config
        out = []
        for where, row in read_rows(path):
            prompt = row.get(c.prompt_key)
            if not isinstance(prompt, str) or not prompt:
                raise DataError(f"{where}: expected a non-empty string under {c.prompt_key!r}")
            reference = row.get(c.reference_key, "")
            if not isinstance(reference, str):
                raise DataError(f"{where}: {c.reference_key!r} must be a string")
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            out.append({"prompt": prompt, "prompt_ids": ids, "reference": reference})
        if not out:
            raise DataError(f"{path}: the file has no rows")
        return out

    def rollout(self, models: Models, examples: Sequence[Example]) -> list[Example]:
        c, tok = self.config, self.tokenizer
        policy = unwrap(models.policy)
        device = next(policy.parameters()).device
        g = c.num_generations
        group = [e for e in examples for _ in range(g)]
        ids, mask = left_pad([e["prompt_ids"] for e in group], tok.pad_token_id)
        generated = policy.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            temperature=c.temperature,
            top_p=c.top_p,
            max_new_tokens=c.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )[:, ids.size(1) :].tolist()
        completions = [_until_eos(row, tok.eos_token_id, tok.pad_token_id) for row in generated]
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        rewards = torch.zeros(len(group))
        for weight, reward in self.rewards:
            scores = reward([e["prompt"] for e in group], texts, references=[e["reference"] for e in group])
            rewards += weight * torch.as_tensor(scores, dtype=torch.float32).cpu()
        advantages = ADVANTAGES[c.advantage](rewards.view(-1, g)).view(-1)

        rows = [
            {"input_ids": e["prompt_ids"] + comp, "labels": [-100] * len(e["prompt_ids"]) + comp}
            for e, comp in zip(group, completions)
        ]
        batch = self.collate_tokens(rows)
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        old = token_logps(policy(**inputs).logits, inputs["input_ids"]).cpu()
        ref = token_logps(models["reference"](**inputs).logits, inputs["input_ids"]).cpu() if "reference" in models else old
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            row.update(
                old_logps=old[i, :n].tolist(),
                ref_logps=ref[i, :n].tolist(),
                advantage=float(advantages[i]),
                reward=float(rewards[i]),
            )
        return rows

    def collate_tokens(self, rows: Sequence[Example]) -> Batch:
        width = max(len(r["input_ids"]) for r in rows)
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]),
            "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows]),
        }

    def collate(self, examples: Sequence[Example]) -> Batch:
        batch = self.collate_tokens(examples)
        width = batch["input_ids"].size(1)
        for name in ("old_logps", "ref_logps"):
            batch[name] = torch.tensor([e[name] + [0.0] * (width - len(e[name])) for e in examples])
        batch["advantages"] = torch.tensor([e["advantage"] for e in examples])
        batch["rewards"] = torch.tensor([e["reward"] for e in examples])
        return batch


def _until_eos(row: list[int], eos: int | None, pad: int) -> list[int]:
    """The completion up to and including its first EOS (the policy learns to stop)."""
    if eos is not None and eos in row:
        return row[: row.index(eos) + 1]
    return [t for t in row if t != pad] or row[:1]
