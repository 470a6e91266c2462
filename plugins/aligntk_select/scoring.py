"""Scoring rows with small models: completion perplexity, IFD, reward, learnability.

Every score is computed from the mean token negative log-likelihood of a row's completion
(prompt tokens labelled ``IGNORE_INDEX``), batched under ``torch.no_grad``:

* ``perplexity``: ``exp(nll(completion | prompt))``;
* ``ifd`` (instruction-following difficulty, Li et al. 2023, https://arxiv.org/abs/2308.12032):
  ``exp(nll(completion | prompt)) / exp(nll(completion | start))``, where ``start`` is what
  the tokenizer puts before any text (its BOS), so the completion is scored alone;
* ``learnability``: ``nll_weak(completion | prompt) - nll_strong(completion | prompt)``, the
  loss gap between a weak and a stronger model (high: the strong model learnt it, the weak
  one has not yet);
* ``reward``: a scalar-head reward model's score (``logits[:, 0]``) of prompt + completion.

A row is prompt/completion strings, prompt/completion messages, a ``messages`` conversation
ending with the assistant's reply (rendered with the tokenizer's chat template; the reply
is the completion), or a ``text`` (all of it the completion, after the start tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aligntk import IGNORE_INDEX, DataError, check_messages, class_logits, describe_type, pad, render_chat, token_logps


@dataclass(frozen=True)
class Keys:
    """The columns a row is read from."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    text: str = "text"


@dataclass(frozen=True)
class Encoded:
    """One row as tokens: ``prompt_ids`` (never empty) then ``completion_ids`` (never empty)."""

    where: str
    prompt_ids: list[int]
    completion_ids: list[int]


def start_ids(tokenizer: Any) -> list[int]:
    """What the tokenizer puts before any text: its special prefix, else BOS, else EOS."""
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    if ids:
        return ids
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return [token_id]
    raise DataError("the tokenizer has no BOS or EOS token to start a sequence with")


def encode_row(where: str, row: dict[str, Any], tokenizer: Any, keys: Keys = Keys()) -> Encoded:
    """A row's prompt and completion tokens, as the ``sft`` data tokenizes them.

    Strings: the prompt with the tokenizer's special tokens, the completion without, then
    EOS. Messages: the conversation before the last assistant reply rendered with the
    generation prompt is the prompt, the rest of the rendering the completion.

    Raises:
        DataError: ``where: ...`` naming what is wrong with the row.
    """
    prompt, completion = row.get(keys.prompt), row.get(keys.completion)
    if isinstance(prompt, str) and isinstance(completion, str):
        prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) or start_ids(tokenizer)
        completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            completion_ids.append(tokenizer.eos_token_id)
        return _checked(where, prompt_ids, completion_ids)
    if isinstance(prompt, list) and completion is not None:
        messages = check_messages(prompt, where, keys.prompt)
        if isinstance(completion, str):
            reply = [{"role": "assistant", "content": completion}]
        else:
            reply = check_messages(completion, where, keys.completion, role="assistant")
        return _encode_chat(where, [*messages, *reply], len(messages), tokenizer)
    if keys.messages in row:
        messages = check_messages(row[keys.messages], where, keys.messages)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: {keys.messages!r} must end with an assistant message, got role {messages[-1]['role']!r}")
        return _encode_chat(where, messages, len(messages) - 1, tokenizer)
    if isinstance(row.get(keys.text), str):
        completion_ids = list(tokenizer(row[keys.text], add_special_tokens=False)["input_ids"])
        return _checked(where, start_ids(tokenizer), completion_ids)
    if prompt is not None or completion is not None:
        bad = keys.prompt if not isinstance(prompt, (str, list)) else keys.completion
        raise DataError(f"{where}: {bad!r} must be a string (or messages), got {describe_type(row.get(bad))}")
    raise DataError(
        f"{where}: expected {keys.prompt!r} and {keys.completion!r}, a {keys.messages!r} list or a {keys.text!r} "
        f"string (got keys {sorted(row)})"
    )


def _encode_chat(where: str, messages: list[dict[str, Any]], first_reply: int, tokenizer: Any) -> Encoded:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: the row has messages but the tokenizer has no chat template")
    full = render_chat(tokenizer, messages, where)
    before = render_chat(tokenizer, messages[:first_reply], where, generation_prompt=True) if first_reply else ""
    if not full.startswith(before):
        raise DataError(f"{where}: the chat template is not incremental, so the reply cannot be located")
    prompt_ids = list(tokenizer(before, add_special_tokens=False)["input_ids"]) if before else []
    completion_ids = list(tokenizer(full[len(before) :], add_special_tokens=False)["input_ids"])
    return _checked(where, prompt_ids or start_ids(tokenizer), completion_ids)


def _checked(where: str, prompt_ids: list[int], completion_ids: list[int]) -> Encoded:
    if not completion_ids:
        raise DataError(f"{where}: the completion has no tokens to score")
    return Encoded(where, prompt_ids, completion_ids)


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


def pick_device(device: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(folder: Path, tokenizer_folder: Path | None, device: torch.device, reward: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from Hugging Face folders (offline), in eval mode on ``device``.

    Raises:
        DataError: the folder is missing or does not load, in one line.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    for what, path in (("model", folder), ("tokenizer", tokenizer_folder or folder)):
        if not Path(path).is_dir():
            raise DataError(f"{path}: {what} folder not found")
    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder or folder), local_files_only=True)
        model = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError ... for a bad folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{folder}: cannot load the {'reward ' if reward else ''}model: {first}") from None
    if reward and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------


def pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _batches(rows: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (less padding), each batch in file order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt_ids) + len(rows[i].completion_ids))
    return [sorted(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


@torch.no_grad()
def completion_nll(
    model: torch.nn.Module, rows: Sequence[Encoded], pad_token: int, batch_size: int = 32
) -> list[float]:
    """Mean token NLL of each row's completion given its prompt, in nats.

    Each batch is ``input_ids`` ``[B, T]`` right-padded, ``labels`` ``[B, T]`` with
    ``IGNORE_INDEX`` on prompt and padding; ``token_logps`` scores the labelled tokens.

    Raises:
        DataError: a batch the model cannot run, naming its first row.
    """
    device = next(model.parameters()).device
    out = [0.0] * len(rows)
    for batch in _batches(rows, batch_size):
        ids = [rows[i].prompt_ids + rows[i].completion_ids for i in batch]
        labels = [[IGNORE_INDEX] * len(rows[i].prompt_ids) + rows[i].completion_ids for i in batch]
        input_ids = pad(ids, pad_token).to(device)
        mask = pad([[1] * len(x) for x in ids], 0).to(device)
        try:
            lp = token_logps(model, input_ids, mask, labels=pad(labels, IGNORE_INDEX).to(device), chunk_size="auto")
        except (RuntimeError, IndexError, ValueError) as exc:
            raise DataError(f"{rows[batch[0]].where}: the model cannot score this row's batch: {_first_line(exc)}") from None
        nll = -(lp.logps * lp.mask).sum(1) / lp.mask.sum(1)
        for i, value in zip(batch, nll.tolist()):
            out[i] = value
    return out


@torch.no_grad()
def reward_scores(model: torch.nn.Module, rows: Sequence[Encoded], pad_token: int, batch_size: int = 32) -> list[float]:
    """A scalar-head reward model's score (``logits[:, 0]``) of each row's prompt + completion."""
    out = [0.0] * len(rows)
    for batch in _batches(rows, batch_size):
        ids = [rows[i].prompt_ids + rows[i].completion_ids for i in batch]
        tensors = {"input_ids": pad(ids, pad_token), "attention_mask": pad([[1] * len(x) for x in ids], 0)}
        try:
            logits = class_logits(model, tensors)
        except (RuntimeError, IndexError, ValueError) as exc:
            raise DataError(f"{rows[batch[0]].where}: the reward model cannot score this row's batch: {_first_line(exc)}") from None
        for i, value in zip(batch, logits[:, 0].float().tolist()):
            out[i] = value
    return out


def alone(rows: Sequence[Encoded], tokenizer: Any) -> list[Encoded]:
    """The same completions after only the start tokens (IFD's denominator)."""
    start = start_ids(tokenizer)
    return [Encoded(r.where, start, r.completion_ids) for r in rows]


def perplexity(nll: float) -> float:
    """``exp(nll)``, ``inf`` past float range."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
