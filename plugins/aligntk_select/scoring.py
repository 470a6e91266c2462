"""Scoring rows with small models: completion perplexity, IFD, reward, learnability, confidence, loss.

The language-model scores come from the mean token negative log-likelihood of a row's
completion (prompt tokens labelled ``IGNORE_INDEX``), batched under ``torch.no_grad``:

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

The classification scores read a row's ``text`` (and for ``loss`` its label) and a
sequence-classification model's class probabilities ``p = softmax(logits)`` (float32):

* ``confidence``: ``max_c p_c``, how sure the model is of its own answer (for a weak
  supervisor's labels, how sure the supervisor was);
* ``loss``: the cross-entropy ``-sum_c y_c log p_c`` of the row's label ``y``: an integer
  class (one-hot) or a list of class probabilities (a soft label, such as a weak
  supervisor's); ``learnability`` between two classifiers is the gap of these losses.
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


@dataclass(frozen=True)
class Labelled:
    """A classification row as tokens: ``input_ids`` (with the tokenizer's special tokens) and
    its target distribution ``target`` over the ``C`` classes (``None`` when no label is read)."""

    where: str
    input_ids: list[int]
    target: list[float] | None


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


def encode_labelled(
    where: str, row: dict[str, Any], tokenizer: Any, num_classes: int, text_key: str = "text", label_key: str | None = None
) -> Labelled:
    """A classification row's text tokens and, when ``label_key`` is given, its target distribution.

    The label is an integer class in ``[0, num_classes)`` (a digit string, as CSV cells
    are, counts) or a list of ``num_classes`` non-negative numbers summing to 1.

    Raises:
        DataError: ``where: ...`` naming the key that is missing or wrong.
    """
    for key, what in ((text_key, "the text to classify"), (label_key, "the label")):
        if key is not None and key not in row:
            raise DataError(f"{where}: no {key!r} ({what}); the row has keys {sorted(row)}")
    text = row[text_key]
    if not isinstance(text, str):
        raise DataError(f"{where}: {text_key!r} must be a string (the text to classify), got {describe_type(text)}")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if not ids:
        raise DataError(f"{where}: {text_key!r} has no tokens to score")
    if label_key is None:
        return Labelled(where, ids, None)
    return Labelled(where, ids, _target(where, row[label_key], label_key, num_classes))


def _target(where: str, label: Any, key: str, num_classes: int) -> list[float]:
    if isinstance(label, str) and label.strip().isdigit():  # CSV cells are text
        label = int(label)
    if isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < num_classes:
            raise DataError(f"{where}: {key!r} is {label}, outside [0, {num_classes}) (the model has {num_classes} classes)")
        return [1.0 if c == label else 0.0 for c in range(num_classes)]
    if isinstance(label, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in label):
        if len(label) != num_classes:
            raise DataError(f"{where}: {key!r} has {len(label)} probabilities, the model has {num_classes} classes")
        if any(not math.isfinite(v) or v < 0 for v in label) or not math.isclose(sum(label), 1.0, abs_tol=1e-3):
            raise DataError(f"{where}: {key!r} must be non-negative probabilities summing to 1, got {label}")
        return [float(v) for v in label]
    raise DataError(
        f"{where}: {key!r} must be an integer class or a list of {num_classes} probabilities, got {describe_type(label)}"
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


def load_model(
    folder: Path, tokenizer_folder: Path | None, device: torch.device, reward: bool = False, classifier: bool = False
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from Hugging Face folders (offline), in eval mode on ``device``.

    ``reward`` (a scalar head) and ``classifier`` load a sequence-classification model, else a causal LM.

    Raises:
        DataError: the folder is missing or does not load, in one line.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the command prints one line (or one error line), as aligntk's runs do

    for what, path in (("model", folder), ("tokenizer", tokenizer_folder or folder)):
        if not Path(path).is_dir():
            raise DataError(f"{path}: {what} folder not found")
    head = reward or classifier
    cls = AutoModelForSequenceClassification if head else AutoModelForCausalLM
    kind = "reward " if reward else "classification " if classifier else ""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder or folder), local_files_only=True)
        model = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError ... for a bad folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{folder}: cannot load the {kind}model: {first}") from None
    arch = list(getattr(model.config, "architectures", None) or [])
    if classifier and arch and not any(a.endswith("ForSequenceClassification") for a in arch):
        raise DataError(
            f"{folder}: not a sequence-classification model (architectures {arch}); confidence and loss need a classifier"
        )
    if head and getattr(model.config, "pad_token_id", None) is None:
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


def _lengths(rows: Sequence[Encoded]) -> list[int]:
    return [len(r.prompt_ids) + len(r.completion_ids) for r in rows]


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (less padding), each batch in file order."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
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
    for batch in _batches(_lengths(rows), batch_size):
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
    for batch in _batches(_lengths(rows), batch_size):
        ids = [rows[i].prompt_ids + rows[i].completion_ids for i in batch]
        tensors = {"input_ids": pad(ids, pad_token), "attention_mask": pad([[1] * len(x) for x in ids], 0)}
        try:
            logits = class_logits(model, tensors)
        except (RuntimeError, IndexError, ValueError) as exc:
            raise DataError(f"{rows[batch[0]].where}: the reward model cannot score this row's batch: {_first_line(exc)}") from None
        for i, value in zip(batch, logits[:, 0].float().tolist()):
            out[i] = value
    return out


@torch.no_grad()
def class_log_probs(model: torch.nn.Module, rows: Sequence[Labelled], pad_token: int, batch_size: int = 32) -> torch.Tensor:
    """Each row's class log-probabilities, ``log_softmax`` of the classifier's logits in float32.

    Each batch is ``input_ids`` ``[B, T]`` right-padded with its ``attention_mask``.

    Returns:
        ``[N, C]`` float32 on the CPU, in the rows' order.

    Raises:
        DataError: a batch the model cannot run, naming its first row.
    """
    out: list[torch.Tensor | None] = [None] * len(rows)
    for batch in _batches([len(r.input_ids) for r in rows], batch_size):
        ids = [rows[i].input_ids for i in batch]
        tensors = {"input_ids": pad(ids, pad_token), "attention_mask": pad([[1] * len(x) for x in ids], 0)}
        try:
            logits = class_logits(model, tensors)
        except (RuntimeError, IndexError, ValueError) as exc:
            raise DataError(f"{rows[batch[0]].where}: the classifier cannot score this row's batch: {_first_line(exc)}") from None
        for i, row in zip(batch, logits.float().log_softmax(-1).cpu()):
            out[i] = row
    return torch.stack([x for x in out if x is not None])


def confidence(logps: torch.Tensor) -> list[float]:
    """``max_c p_c`` per row from ``[N, C]`` log-probabilities."""
    return logps.max(-1).values.exp().tolist()


def label_loss(logps: torch.Tensor, rows: Sequence[Labelled]) -> list[float]:
    """Cross-entropy ``-sum_c y_c log p_c`` of each row's target ``y`` under ``[N, C]`` log-probabilities."""
    target = torch.tensor([r.target for r in rows], dtype=torch.float32)
    if target.shape != logps.shape:
        raise DataError(f"the labels have {target.shape[-1]} classes, the model {logps.shape[-1]}")
    # 0 * log 0 is 0 here (a one-hot target's other classes), not nan.
    return (-torch.where(target > 0, target * logps, torch.zeros_like(logps)).sum(-1)).tolist()


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
