"""Unpaired preference data: a prompt, one completion and whether it is desirable (KTO, BCO).

A row is ``{"prompt": ..., "completion": ..., "label": bool}`` (TRL's unpaired preference
format): plain text (the prompt tokenized with the tokenizer's special tokens, the completion
without, EOS appended when ``add_eos``), or chat (``prompt`` a list of messages not ending with
the assistant's, ``completion`` an assistant reply as a string or a list of assistant
messages; the prompt is rendered with the generation prompt and the completion is the rest of
the rendering of both, as the ``preference`` data does). ``label`` is a bool (``true``:
desirable), or 0/1, or the strings ``"true"``/``"false"`` a CSV cell holds.

Each batch also carries KTO's mismatched pairs for its KL reference point: row ``i``'s prompt
with row ``i - 1``'s completion (row 0 takes the last one), TRL's rotation of completions by
one within the batch. TRL rotates at dataset preparation, in chunks of the batch size, and
samples sequentially so the chunks are the batches; rotating in ``collate`` gives the same
pairs whatever the data order. A KL row is cut at ``max_length`` (the end of its completion goes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
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
    keep_fitting,
    load_splits,
    pad_tokens,
    read_rows,
    render_chat,
    require_pad_token,
    truncation_cut,
)

#: The batch fields of the unpaired data.
UNPAIRED_FIELDS = frozenset(
    {"input_ids", "attention_mask", "labels", "label", "kl_input_ids", "kl_attention_mask", "kl_labels"}
)


class UnpairedPreferenceDataConfig(FileDataConfig):
    """Options of the ``unpaired_preference`` data component (with ``path``, ``eval_path``,
    ``eval_fraction``, ``max_unk_fraction``).

    Attributes:
        max_length: the most tokens in one sequence (prompt plus completion).
        truncation: when prompt plus completion is longer: ``right`` cuts the completion's end;
            ``left`` cuts the start of the prompt (and the completion's end only if the
            completion alone is too long); ``drop`` skips the row; ``error`` stops.
        add_eos: append the end-of-sequence token to each plain-text completion.
        prompt_key, completion_key, label_key: the columns to read.
    """

    max_length: PositiveInt = 512
    truncation: Truncation = "right"
    add_eos: bool = True
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    label_key: str = "label"


class UnpairedPreferenceData:
    """Prompt and completion with a desirable/undesirable label, tokenized with labels on the completion.

    Each example holds ``prompt_ids`` (after truncation), ``completion_ids``, ``label`` and for
    evaluators ``reference`` (the completion's text, desirable or not).
    """

    Config = UnpairedPreferenceDataConfig
    provides = UNPAIRED_FIELDS

    def __init__(self, config: UnpairedPreferenceDataConfig):
        self.config = config
        self.pad_token_id: int | None = None

    def load(self, ctx: DataContext) -> DataSplits:
        """Read, check and tokenize the training (and evaluation) rows.

        Raises:
            DataError: a file or row is bad (the message names the file and line), the
                tokenizer has no pad token, or a file yields no usable row.
        """
        self.pad_token_id = require_pad_token(ctx.tokenizer)
        return load_splits(
            self.config, ctx.seed, lambda path, report: self._read(path, ctx.tokenizer, report), tokenizer=ctx.tokenizer
        )

    def _read(self, path: Path, tokenizer: Any, report: DataReport) -> list[Example]:
        skipped = DataReport()
        fitted = [self._fit(where, *self._encode(where, row, tokenizer), skipped) for where, row in read_rows(path)]
        return keep_fitting(path, fitted, skipped, report)

    # ----------------------------------------------------------------------------------
    # Checking and tokenizing
    # ----------------------------------------------------------------------------------

    def _encode(self, where: str, row: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int], bool, str]:
        c = self.config
        if row.get(c.completion_key) is None and "chosen" in row and "rejected" in row:
            raise DataError(
                f"{where}: a preference pair (chosen, rejected); the unpaired_preference data reads "
                f"{c.prompt_key!r}, {c.completion_key!r} and {c.label_key!r} (split each pair into a desirable "
                "and an undesirable row, or use the preference data)"
            )
        missing = [k for k in (c.prompt_key, c.completion_key, c.label_key) if row.get(k) is None]
        if missing:
            raise DataError(
                f"{where}: expected {c.prompt_key!r}, {c.completion_key!r} and {c.label_key!r} "
                f"(missing {', '.join(repr(m) for m in missing)}; got keys {sorted(row)})"
            )
        label = _label(row[c.label_key], where, c.label_key)
        prompt, completion = row[c.prompt_key], row[c.completion_key]
        if isinstance(prompt, str):
            if not isinstance(completion, str):
                got = describe_type(completion)
                raise DataError(f"{where}: {c.completion_key!r} must be a string when the prompt is, got {got}")
            eos: list[int] = []
            if c.add_eos:
                if tokenizer.eos_token_id is None:
                    raise DataError(f"{where}: the tokenizer has no eos token to append; set data.add_eos: false")
                eos = [tokenizer.eos_token_id]
            prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
            completion_ids = [*tokenizer(completion, add_special_tokens=False)["input_ids"], *eos]
            return prompt_ids, completion_ids, label, completion
        if isinstance(prompt, list):
            return self._encode_chat(where, prompt, completion, label, tokenizer)
        raise DataError(f"{where}: {c.prompt_key!r} must be a string or a list of messages, got {describe_type(prompt)}")

    def _encode_chat(
        self, where: str, prompt: list[Any], completion: Any, label: bool, tokenizer: Any
    ) -> tuple[list[int], list[int], bool, str]:
        c = self.config
        messages = check_messages(prompt, where, c.prompt_key)
        if messages[-1]["role"] == "assistant":
            raise DataError(f"{where}: {c.prompt_key!r} must not end with an assistant message (that is the completion)")
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        reply = check_messages(completion, where, c.completion_key, role="assistant")
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: the prompt is a list of messages but the tokenizer has no chat template")
        prompt_text = render_chat(tokenizer, messages, where, generation_prompt=True)
        full = render_chat(tokenizer, [*messages, *reply], where)
        if not full.startswith(prompt_text):
            raise DataError(
                f"{where}: the chat template's rendering of the prompt with the generation prompt is not a prefix "
                f"of its rendering with the {c.completion_key!r} reply, so the reply cannot be located"
            )
        prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        completion_ids = list(tokenizer(full[len(prompt_text) :], add_special_tokens=False)["input_ids"])
        return prompt_ids, completion_ids, label, reply[-1]["content"]

    def _fit(
        self, where: str, prompt_ids: list[int], completion_ids: list[int], label: bool, text: str, report: DataReport
    ) -> Example | None:
        """Apply the truncation policy; ``None`` for a row skipped (and counted in ``report``)."""
        limit = self.config.max_length
        cut = truncation_cut(
            len(prompt_ids) + len(completion_ids), len(prompt_ids), limit, self.config.truncation, where, report
        )
        if cut is None:
            return None
        prompt = prompt_ids[cut:]
        labels = ([IGNORE_INDEX] * len(prompt) + completion_ids)[:limit]
        if not has_targets(labels, report):
            return None
        completion = completion_ids[: limit - len(prompt)]
        return {"prompt_ids": prompt, "completion_ids": completion, "label": label, "reference": text}

    # ----------------------------------------------------------------------------------
    # Batching
    # ----------------------------------------------------------------------------------

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Right-pad the matched and the KL (mismatched) sequences, each to its own width.

        Returns:
            ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` (prompt + completion),
            ``kl_input_ids``, ``kl_attention_mask``, ``kl_labels`` ``[B, T']`` (row ``i``'s
            prompt with row ``i - 1``'s completion, cut at ``max_length``), int64, and
            ``label`` ``[B]`` bool.
        """
        if self.pad_token_id is None:
            raise RuntimeError("UnpairedPreferenceData.collate needs load() first (it takes the pad token)")
        limit = self.config.max_length
        ids = [e["prompt_ids"] + e["completion_ids"] for e in examples]
        labels = [[IGNORE_INDEX] * len(e["prompt_ids"]) + e["completion_ids"] for e in examples]
        batch: Batch = dict(pad_tokens(ids, self.pad_token_id, labels))
        shifted = [examples[-1], *examples[:-1]]
        pairs = list(zip(examples, shifted))
        kl_ids = [(e["prompt_ids"] + o["completion_ids"])[:limit] for e, o in pairs]
        kl_labels = [([IGNORE_INDEX] * len(e["prompt_ids"]) + o["completion_ids"])[:limit] for e, o in pairs]
        batch.update({f"kl_{k}": v for k, v in pad_tokens(kl_ids, self.pad_token_id, kl_labels).items()})
        batch["label"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
        return batch


def _label(value: Any, where: str, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")  # CSV cells arrive as strings
    raise DataError(f"{where}: {key!r} must be true or false (desirable or not), got {value!r}")
