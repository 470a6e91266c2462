"""Supervised fine-tuning data: prompt/completion pairs, chat conversations or plain text.

A row is one of TRL's formats:

* ``{"prompt": str, "completion": str}``: loss on the completion;
* ``{"prompt": [messages], "completion": [assistant messages]}`` (or a string completion):
  rendered with the chat template, loss on the completion's messages only;
* ``{"messages": [{"role", "content"}, ...]}`` ending with an assistant message, or ShareGPT's
  ``{"conversations": [{"from", "value"}, ...]}``: loss on every assistant message;
* ``{"text": str}`` (language modelling): loss on every token.

Labels follow the Hugging Face convention: aligned with ``input_ids`` (the loss shifts
them), ``-100`` where no loss is taken.
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
    DataCapabilities,
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


class SFTDataConfig(FileDataConfig):
    """Options of the ``sft`` data component (with ``path``, ``eval_path``, ``eval_fraction``,
    ``max_unk_fraction``).

    Attributes:
        max_length: the most tokens in one sequence.
        truncation: what to do with a longer sequence. ``right`` cuts its end; ``left`` cuts
            the start of the prompt and keeps the completion (cutting the completion's end
            only if it alone is too long); ``drop`` skips the row; ``error`` stops.
        include_prompt: also train on the prompt tokens.
        add_eos: append the end-of-sequence token to each completion (prompt/completion and
            text rows; chat templates add their own end-of-turn tokens).
        prompt_key: the column holding the prompt.
        completion_key: the column holding the completion.
        messages_key: the column holding a conversation.
        conversations_key: the column holding a ShareGPT conversation (``from``/``value``).
        text_key: the column holding a text to learn every token of.
        packing: padding-free batches: ``collate`` joins a micro-batch's sequences into one
            row with ``position_ids`` restarting at 0 for each (no ``attention_mask``; the
            model builds a block-diagonal causal mask from the positions).
    """

    not_encoding = FileDataConfig.not_encoding | {"packing"}  # collate's business only

    max_length: PositiveInt = 512
    truncation: Truncation = "right"
    include_prompt: bool = False
    add_eos: bool = True
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    messages_key: str = "messages"
    conversations_key: str = "conversations"
    text_key: str = "text"
    packing: bool = False


@dataclass
class _Pair:
    where: str
    prompt: str
    completion: str


@dataclass
class _Chat:
    """A conversation; assistant messages from ``first_target`` on are learnt."""

    where: str
    messages: list[dict[str, Any]]
    first_target: int = 0


@dataclass
class _Text:
    where: str
    text: str


@dataclass
class _Encoded:
    """A tokenized row before truncation. ``prompt_len`` tokens precede the last completion."""

    where: str
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    prompt_ids: list[int]
    reference: str


class SFTData:
    """Prompt/completion or chat rows, tokenized with loss on the completion tokens.

    Each example is ``{"input_ids", "labels", "prompt_ids", "reference"}``: evaluators generate
    from ``prompt_ids`` (not truncated) and compare with ``reference`` (the completion, or the
    last assistant message).
    """

    Config = SFTDataConfig
    provides = frozenset({"input_ids", "attention_mask", "labels"})

    @classmethod
    def capabilities(cls, config: SFTDataConfig) -> DataCapabilities:
        """Packed batches carry ``position_ids`` instead of an attention mask."""
        packed = frozenset({"input_ids", "position_ids", "labels"})
        return DataCapabilities(
            provides=packed if config.packing else cls.provides,
            example_fields=frozenset({"input_ids", "labels", "prompt_ids", "reference"}),
        )

    def __init__(self, config: SFTDataConfig):
        self.config = config
        self.pad_token_id: int | None = None

    # ----------------------------------------------------------------------------------
    # Loading
    # ----------------------------------------------------------------------------------

    def load(self, ctx: DataContext) -> DataSplits:
        """Read, check and tokenize the training (and evaluation) rows.

        Raises:
            DataError: a file or row is bad (the message names the file and line), the
                tokenizer has no pad token, a file yields no usable example, or a file has
                more unknown tokens than ``max_unk_fraction``.
        """
        self.pad_token_id = require_pad_token(ctx.tokenizer)
        # Two stages, as two passes over a file: every row's shape is checked before any is tokenized.
        stages = (self._check_row, functools.partial(self._encode_row, ctx.tokenizer))
        return load_splits(self.config, ctx.seed, encode=stages, tokenizer=ctx.tokenizer)

    def _check_row(self, where: str, row: dict[str, Any], report: DataReport) -> _Pair | _Chat | _Text:
        return self._parse(where, row)

    def _encode_row(self, tokenizer: Any, where: str, row: _Pair | _Chat | _Text, report: DataReport) -> Example | None:
        return self._fit(self._encode(row, tokenizer), report)

    def _parse(self, where: str, row: dict[str, Any]) -> _Pair | _Chat | _Text:
        """Check a row's shape: a conversation, a prompt and a completion, or a text."""
        c = self.config
        for key in (c.messages_key, c.conversations_key):
            if row.get(key) is not None:
                return _Chat(where, _check_messages(row[key], where, key))
        if c.prompt_key in row and c.completion_key in row:
            return self._parse_pair(where, row[c.prompt_key], row[c.completion_key])
        if row.get(c.text_key) is not None:
            if not isinstance(row[c.text_key], str):
                raise DataError(f"{where}: {c.text_key!r} must be a string, got {describe_type(row[c.text_key])}")
            return _Text(where, row[c.text_key])
        raise DataError(
            f"{where}: expected {c.prompt_key!r} and {c.completion_key!r} strings or a {c.messages_key!r} list "
            f"(got keys {sorted(row)}); also read: {c.prompt_key!r} and {c.completion_key!r} messages, "
            f"a {c.conversations_key!r} list (ShareGPT), a {c.text_key!r} string"
        )

    def _parse_pair(self, where: str, prompt: Any, completion: Any) -> _Pair | _Chat:
        """Strings are a plain pair; a list of prompt messages makes a conversation learnt on the completion."""
        c = self.config
        if isinstance(prompt, str):
            if not isinstance(completion, str):
                raise DataError(f"{where}: {c.completion_key!r} must be a string, got {describe_type(completion)}")
            return _Pair(where, prompt, completion)
        if not isinstance(prompt, list):
            raise DataError(
                f"{where}: {c.prompt_key!r} must be a string or a list of messages, got {describe_type(prompt)}"
            )
        messages = check_messages(prompt, where, c.prompt_key)
        if messages[-1]["role"] == "assistant":
            raise DataError(
                f"{where}: {c.prompt_key!r} must not end with an assistant message (that is the completion)"
            )
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        reply = check_messages(
            completion, where, c.completion_key, expected="a string or a list of messages", role="assistant"
        )
        return _Chat(where, _check_messages([*messages, *reply], where, c.prompt_key), first_target=len(messages))

    # ----------------------------------------------------------------------------------
    # Tokenizing
    # ----------------------------------------------------------------------------------

    def _encode(self, row: _Pair | _Chat | _Text, tokenizer: Any) -> _Encoded:
        if isinstance(row, _Pair):
            return self._encode_pair(row, tokenizer)
        if isinstance(row, _Chat):
            return self._encode_chat(row, tokenizer)
        return self._encode_text(row, tokenizer)

    def _encode_text(self, row: _Text, tokenizer: Any) -> _Encoded:
        """Language modelling: every token is a target, so there is no prompt (evaluators get none)."""
        input_ids = list(tokenizer(row.text, add_special_tokens=True)["input_ids"])
        if self.config.add_eos:
            if tokenizer.eos_token_id is None:
                raise DataError(f"{row.where}: the tokenizer has no eos token to append; set data.add_eos: false")
            input_ids.append(tokenizer.eos_token_id)
        return _Encoded(row.where, input_ids, list(input_ids), prompt_len=0, prompt_ids=[], reference=row.text)

    def _encode_pair(self, row: _Pair, tokenizer: Any) -> _Encoded:
        prompt_ids = tokenizer(row.prompt, add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(row.completion, add_special_tokens=False)["input_ids"]
        if self.config.add_eos:
            if tokenizer.eos_token_id is None:
                raise DataError(f"{row.where}: the tokenizer has no eos token to append; set data.add_eos: false")
            completion_ids = [*completion_ids, tokenizer.eos_token_id]
        prompt_labels = list(prompt_ids) if self.config.include_prompt else [IGNORE_INDEX] * len(prompt_ids)
        return _Encoded(
            where=row.where,
            input_ids=[*prompt_ids, *completion_ids],
            labels=[*prompt_labels, *completion_ids],
            prompt_len=len(prompt_ids),
            prompt_ids=list(prompt_ids),
            reference=row.completion,
        )

    def _encode_chat(self, row: _Chat, tokenizer: Any) -> _Encoded:
        text, spans, prompt_text = _assistant_spans(row, tokenizer)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids: list[int] = enc["input_ids"]
        offsets: list[tuple[int, int]] = enc["offset_mapping"]
        # A token is an output token if it overlaps an assistant span: a token straddling the
        # boundary (BPE merging a template space into the first word) still carries content.
        labelled = [any(start < e and end > s for s, e in spans) for start, end in offsets]
        labels = [
            tok if (keep or self.config.include_prompt) else IGNORE_INDEX for tok, keep in zip(input_ids, labelled)
        ]
        last_start = spans[-1][0]
        prompt_len = next((i for i, (_, end) in enumerate(offsets) if end > last_start), len(offsets))
        return _Encoded(
            where=row.where,
            input_ids=input_ids,
            labels=labels,
            prompt_len=prompt_len,
            prompt_ids=tokenizer(prompt_text, add_special_tokens=False)["input_ids"],
            reference=row.messages[-1]["content"],
        )

    # ----------------------------------------------------------------------------------
    # Truncating
    # ----------------------------------------------------------------------------------

    def _fit(self, enc: _Encoded, report: DataReport) -> Example | None:
        """Apply the truncation policy; ``None`` for a row skipped (and counted in ``report``)."""
        limit = self.config.max_length
        cut = truncation_cut(len(enc.input_ids), enc.prompt_len, limit, self.config.truncation, enc.where, report)
        if cut is None:
            return None
        ids, labels = enc.input_ids[cut:][:limit], enc.labels[cut:][:limit]
        if not has_targets(labels, report):
            return None
        return {"input_ids": ids, "labels": labels, "prompt_ids": enc.prompt_ids, "reference": enc.reference}

    # ----------------------------------------------------------------------------------
    # Batching
    # ----------------------------------------------------------------------------------

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Right-pad examples to the longest one in the micro-batch (or pack them: ``packing``).

        Returns:
            ``input_ids`` ``[B, T]`` (padded with the pad token), ``attention_mask`` ``[B, T]``
            (1 real, 0 padding) and ``labels`` ``[B, T]`` (padded with ``-100``), all int64.
            With ``packing``: see ``pack``.
        """
        if self.pad_token_id is None:
            raise RuntimeError("SFTData.collate needs load() first (it takes the pad token from the tokenizer)")
        if self.config.packing:
            return pack(examples)
        return pad_tokens([e["input_ids"] for e in examples], self.pad_token_id, [e["labels"] for e in examples])


def pack(examples: Sequence[Example]) -> Batch:
    """Join examples into one row without padding (Krell et al. 2021, arXiv:2107.02027).

    ``position_ids`` restart at 0 for each example: with no ``attention_mask``, transformers
    (``masking_utils.find_packed_sequence_indices``) then masks attention block-diagonally,
    and rotary positions match the unpacked rows. Each example's first label becomes
    ``-100``: it would be predicted from the previous example's last token. (It is never a
    target in a padded batch either, so the loss and its token count are the same.) The
    engine counts ``input_ids.numel()`` tokens, all real.

    Returns:
        ``input_ids``, ``labels``, ``position_ids``: ``[1, N]`` int64, ``N`` the total length.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for e in examples:
        input_ids += e["input_ids"]
        labels += [IGNORE_INDEX, *e["labels"][1:]]
        positions += range(len(e["input_ids"]))
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
    }


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _check_messages(messages: Any, where: str, key: str) -> list[dict[str, Any]]:
    """A conversation to learn from: checked messages, ending with the assistant's, not starting with it."""
    messages = check_messages(messages, where, key)
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message must be the assistant's (the completion to learn), "
            f"got role {messages[-1]['role']!r}"
        )
    if messages[0]["role"] == "assistant":
        raise DataError(
            f"{where}: the conversation starts with the assistant; it needs a message before the first reply"
        )
    return messages


def _assistant_spans(row: _Chat, tokenizer: Any) -> tuple[str, list[tuple[int, int]], str]:
    """Render a conversation and find where each assistant message lies in the text.

    An assistant message ``i`` spans from the end of ``messages[:i]`` rendered with the
    generation prompt to the end of ``messages[:i + 1]``. Both renderings must be prefixes
    of the whole conversation's, or the spans would be wrong.

    Returns:
        ``(text, spans, prompt_text)``: the rendered conversation, the ``(start, end)``
        character spans of the assistant messages, and the rendering that precedes the
        last one (the prompt to generate from).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{row.where}: the row has messages but the tokenizer has no chat template; "
            "use a tokenizer with one, or prompt/completion rows"
        )

    text = render_chat(tokenizer, row.messages, row.where)
    spans: list[tuple[int, int]] = []
    prompt_text = ""
    for i, message in enumerate(row.messages):
        if message["role"] != "assistant" or i < row.first_target:
            continue
        before = render_chat(tokenizer, row.messages[:i], row.where, generation_prompt=True)
        through = render_chat(tokenizer, row.messages[: i + 1], row.where)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise DataError(
                f"{row.where}: the tokenizer's chat template is not incremental (rendering the first {i} "
                "messages is not a prefix of rendering the whole conversation), so the assistant "
                "messages cannot be located"
            )
        spans.append((len(before), len(through)))
        prompt_text = before
    return text, spans, prompt_text
