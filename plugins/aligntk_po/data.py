"""Preference data: a prompt with a chosen and a rejected completion, labelled on completions.

A row is one of:

* ``{"prompt": str, "chosen": str, "rejected": str}``: plain text. The prompt is tokenized
  with the tokenizer's special tokens (BOS), each completion without, and EOS is appended
  to each completion (``add_eos``).
* ``{"prompt": [messages], "chosen": ..., "rejected": ...}``: chat. ``prompt`` is a list of
  ``{"role", "content"}`` messages not ending with the assistant's; ``chosen`` and
  ``rejected`` are each an assistant reply as a string or a list of assistant messages.
  The prompt is rendered with the chat template and the generation prompt; a completion is
  the rest of the rendering of prompt plus reply. Prompt and completion are tokenized
  separately and concatenated (as TRL does), so both sides share the prompt's tokens.

* ``{"chosen": [messages], "rejected": [messages]}`` (or two strings): the implicit prompt
  of TRL's format. The messages both lists start with (the common text, for strings, less a
  trailing space) become the prompt, as ``trl.extract_prompt`` does.

Messages may be ShareGPT turns or have text-part contents (``aligntk.normalize_messages``).
Either form may carry a number ``margin`` (how much better ``chosen`` is; default 0), read
by the ``reward_model`` loss. Unpaired rows (``prompt``, ``completion``, ``label``, as KTO
reads) are refused: no built-in loss takes them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import PositiveInt

from aligntk import (
    IGNORE_INDEX,
    Batch,
    DataContext,
    DataError,
    DataReport,
    DataSplits,
    Example,
    FileDataConfig,
    Truncation,
    check_messages,
    describe_type,
    has_targets,
    load_splits,
    pad_tokens,
    render_chat,
    require_pad_token,
    truncation_cut,
)

SIDES = ("chosen", "rejected")


class PreferenceDataConfig(FileDataConfig):
    """Options of the ``preference`` data component (with ``path``, ``eval_path``, ``eval_fraction``,
    ``max_unk_fraction``).

    Attributes:
        max_length: the most tokens in one sequence (prompt plus one completion).
        truncation: what to do when prompt plus a completion is longer. ``right`` cuts the
            completion's end; ``left`` cuts the start of the prompt (the same for both
            sides) and the completion's end only if the completion alone is too long;
            ``drop`` skips the pair; ``error`` stops.
        add_eos: append the end-of-sequence token to each plain-text completion.
        prompt_key, chosen_key, rejected_key, margin_key: the columns to read.
    """

    max_length: PositiveInt = 512
    truncation: Truncation = "right"
    add_eos: bool = True
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    margin_key: str = "margin"


@dataclass
class _Encoded:
    """A tokenized pair before truncation: one prompt, two completions."""

    where: str
    prompt_ids: list[int]
    completions: dict[str, list[int]]
    reference: str
    margin: float


class PreferenceData:
    """Preference pairs, tokenized with labels on the completion tokens only.

    Each example holds ``chosen_input_ids``/``chosen_labels``, ``rejected_input_ids``/
    ``rejected_labels``, ``margin``, and for evaluators ``prompt_ids`` (not truncated) and
    ``reference`` (the chosen completion's text).
    """

    Config = PreferenceDataConfig
    provides = frozenset(
        {f"{side}_{name}" for side in SIDES for name in ("input_ids", "attention_mask", "labels")} | {"margin"}
    )

    def __init__(self, config: PreferenceDataConfig):
        self.config = config
        self.pad_token_id: int | None = None

    # ----------------------------------------------------------------------------------
    # Loading
    # ----------------------------------------------------------------------------------

    def load(self, ctx: DataContext) -> DataSplits:
        """Read, check and tokenize the training (and evaluation) pairs.

        Raises:
            DataError: a file or row is bad (the message names the file and line), the
                tokenizer has no pad token, a file yields no usable pair, or a file has
                more unknown tokens than ``max_unk_fraction``.
        """
        self.pad_token_id = require_pad_token(ctx.tokenizer)
        # Two stages, as two passes over a file: every pair is checked and tokenized before any is truncated.
        stages = (functools.partial(self._encode_row, ctx.tokenizer), self._fit_row)
        return load_splits(self.config, ctx.seed, encode=stages, tokenizer=ctx.tokenizer)

    def _encode_row(self, tokenizer: Any, where: str, row: dict[str, Any], report: DataReport) -> _Encoded:
        return self._encode(where, row, tokenizer)

    def _fit_row(self, where: str, enc: _Encoded, report: DataReport) -> Example | None:
        return self._fit(enc, report)

    # ----------------------------------------------------------------------------------
    # Checking and tokenizing
    # ----------------------------------------------------------------------------------

    def _encode(self, where: str, row: dict[str, Any], tokenizer: Any) -> _Encoded:
        c = self.config
        if row.get(c.chosen_key) is None and "completion" in row and "label" in row:
            raise DataError(
                f"{where}: an unpaired preference row (prompt, completion, label, as KTO reads); the preference "
                f"data reads pairs ({c.prompt_key!r}, {c.chosen_key!r}, {c.rejected_key!r}), and unpaired data "
                "needs a loss that takes it, which aligntk does not have yet"
            )
        if row.get(c.prompt_key) is None and row.get(c.chosen_key) is not None and row.get(c.rejected_key) is not None:
            prompt, chosen, rejected = _extract_prompt(row[c.chosen_key], row[c.rejected_key], where, c)
            row = {**row, c.prompt_key: prompt, c.chosen_key: chosen, c.rejected_key: rejected}
        missing = [k for k in (c.prompt_key, c.chosen_key, c.rejected_key) if row.get(k) is None]
        if missing:
            raise DataError(
                f"{where}: expected {c.prompt_key!r}, {c.chosen_key!r} and {c.rejected_key!r} "
                f"(missing {', '.join(repr(m) for m in missing)}; got keys {sorted(row)})"
            )
        margin = _margin(row.get(c.margin_key), where, c.margin_key)
        prompt = row[c.prompt_key]
        if isinstance(prompt, str):
            return self._encode_text(where, row, prompt, margin, tokenizer)
        if isinstance(prompt, list):
            return self._encode_chat(where, row, prompt, margin, tokenizer)
        raise DataError(
            f"{where}: {c.prompt_key!r} must be a string or a list of messages, got {describe_type(prompt)}"
        )

    def _encode_text(self, where: str, row: dict[str, Any], prompt: str, margin: float, tokenizer: Any) -> _Encoded:
        texts = {}
        for side, key in zip(SIDES, (self.config.chosen_key, self.config.rejected_key)):
            if not isinstance(row[key], str):
                raise DataError(f"{where}: {key!r} must be a string when the prompt is, got {describe_type(row[key])}")
            texts[side] = row[key]
        eos: list[int] = []
        if self.config.add_eos:
            if tokenizer.eos_token_id is None:
                raise DataError(f"{where}: the tokenizer has no eos token to append; set data.add_eos: false")
            eos = [tokenizer.eos_token_id]
        completions = {s: [*tokenizer(t, add_special_tokens=False)["input_ids"], *eos] for s, t in texts.items()}
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return _Encoded(where, list(prompt_ids), completions, texts["chosen"], margin)

    def _encode_chat(
        self, where: str, row: dict[str, Any], prompt: list[Any], margin: float, tokenizer: Any
    ) -> _Encoded:
        c = self.config
        messages = _check_messages(prompt, where, c.prompt_key, last_not="assistant")
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: the prompt is a list of messages but the tokenizer has no chat template")
        prompt_text = render_chat(tokenizer, messages, where, generation_prompt=True)
        completions: dict[str, list[int]] = {}
        replies: dict[str, list[dict[str, Any]]] = {}
        for side, key in zip(SIDES, (c.chosen_key, c.rejected_key)):
            value = row[key]
            if isinstance(value, str):
                value = [{"role": "assistant", "content": value}]
            reply = _check_messages(value, where, key, only="assistant")
            full = render_chat(tokenizer, [*messages, *reply], where)
            if not full.startswith(prompt_text):
                raise DataError(
                    f"{where}: the chat template's rendering of the prompt with the generation prompt is not a "
                    f"prefix of its rendering with the {key!r} reply, so the reply cannot be located"
                )
            completions[side] = tokenizer(full[len(prompt_text) :], add_special_tokens=False)["input_ids"]
            replies[side] = reply
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        return _Encoded(where, list(prompt_ids), completions, replies["chosen"][-1]["content"], margin)

    # ----------------------------------------------------------------------------------
    # Truncating
    # ----------------------------------------------------------------------------------

    def _fit(self, enc: _Encoded, report: DataReport) -> Example | None:
        """Apply the truncation policy; ``None`` for a pair skipped (and counted in ``report``)."""
        limit = self.config.max_length
        longest = len(enc.prompt_ids) + max(len(ids) for ids in enc.completions.values())
        # The longer side decides; the same prompt tokens go from both, so they still share a prompt.
        cut = truncation_cut(longest, len(enc.prompt_ids), limit, self.config.truncation, enc.where, report)
        if cut is None:
            return None
        prompt = enc.prompt_ids[cut:]
        example: Example = {"prompt_ids": enc.prompt_ids, "reference": enc.reference, "margin": enc.margin}
        for side, completion in enc.completions.items():
            ids = [*prompt, *completion][:limit]
            labels = ([IGNORE_INDEX] * len(prompt) + list(completion))[:limit]
            if not has_targets(labels, report):
                return None
            example[f"{side}_input_ids"] = ids
            example[f"{side}_labels"] = labels
        return example

    # ----------------------------------------------------------------------------------
    # Batching
    # ----------------------------------------------------------------------------------

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Right-pad chosen and rejected sequences to ONE common width per micro-batch.

        One width lets a loss concatenate chosen and rejected rows along the batch for a
        single forward pass; pairs stay in separate tensors so that splitting a batch along
        dim 0 keeps every pair together.

        Returns:
            ``{chosen,rejected}_input_ids`` ``[B, T]`` (padded with the pad token),
            ``{chosen,rejected}_attention_mask`` ``[B, T]`` (1 real, 0 padding),
            ``{chosen,rejected}_labels`` ``[B, T]`` (padded with ``-100``), all int64, and
            ``margin`` ``[B]`` float32.
        """
        if self.pad_token_id is None:
            raise RuntimeError("PreferenceData.collate needs load() first (it takes the pad token from the tokenizer)")
        width = max(len(e[f"{side}_input_ids"]) for e in examples for side in SIDES)
        batch: Batch = {}
        for side in SIDES:
            padded = pad_tokens(
                [e[f"{side}_input_ids"] for e in examples],
                self.pad_token_id,
                [e[f"{side}_labels"] for e in examples],
                width=width,
            )
            batch.update({f"{side}_{name}": value for name, value in padded.items()})
        batch["margin"] = torch.tensor([float(e["margin"]) for e in examples], dtype=torch.float32)
        return batch


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _margin(value: Any, where: str, key: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{where}: {key!r} must be a number, got {describe_type(value)}")
    try:
        return float(value)  # CSV cells arrive as strings
    except ValueError:
        raise DataError(f"{where}: {key!r} must be a number, got {value!r}") from None


def _extract_prompt(chosen: Any, rejected: Any, where: str, c: PreferenceDataConfig) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` from two full conversations (or texts) that share the prompt.

    As ``trl.extract_prompt``: the longest common prefix of messages (of characters for
    strings, less a space it ends with) is the prompt; the rest of each side is its reply.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n < min(len(chosen), len(rejected)) and n > 0 and chosen[n - 1] == " ":
            n -= 1  # the space belongs to the replies, as TRL has it
    elif isinstance(chosen, list) and isinstance(rejected, list):
        chosen = check_messages(chosen, where, c.chosen_key)
        rejected = check_messages(rejected, where, c.rejected_key)
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
    else:
        raise DataError(
            f"{where}: without {c.prompt_key!r}, {c.chosen_key!r} and {c.rejected_key!r} must both be lists of "
            f"messages (or both strings) that start with the prompt, got {describe_type(chosen)} and "
            f"{describe_type(rejected)}"
        )
    if n == 0:
        raise DataError(
            f"{where}: without {c.prompt_key!r}, {c.chosen_key!r} and {c.rejected_key!r} must start with the same "
            "prompt, but they differ from the start"
        )
    if n == len(chosen) or n == len(rejected):
        raise DataError(
            f"{where}: without {c.prompt_key!r}, the prompt is what {c.chosen_key!r} and {c.rejected_key!r} share, "
            "but one of them is all prompt: it has no reply"
        )
    return chosen[:n], chosen[n:], rejected[n:]


def _check_messages(
    messages: Any, where: str, key: str, only: str | None = None, last_not: str | None = None
) -> list[dict[str, Any]]:
    """Checked messages (``aligntk.check_messages``), all of role ``only``, not ending with ``last_not``."""
    messages = check_messages(messages, where, key, expected="a string or a list of messages", role=only)
    if last_not is not None and messages[-1]["role"] == last_not:
        raise DataError(f"{where}: {key!r} must not end with an {last_not} message (the replies are chosen/rejected)")
    return messages
