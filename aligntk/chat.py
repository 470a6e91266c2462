"""Chat rows: checking a list of messages, and rendering it with the tokenizer's chat template.

A message is ``{"role": str, "content": str}``. Data components check a row's messages
with :func:`check_messages` (then add the role rules of their format) and render them
with :func:`render_chat`, so a bad conversation is reported the same way everywhere:
``data/train.jsonl:3: messages[1].content must be a string, got null``.

:func:`check_messages` first maps the other spellings datasets use to that form
(:func:`normalize_messages`): ShareGPT's ``{"from": "human", "value": ...}`` and a
``content`` given as a list of text parts (``[{"type": "text", "text": ...}]``).
"""

from __future__ import annotations

from typing import Any

from .datafiles import describe_type
from .errors import DataError


#: ShareGPT speakers (``from``) and the roles they become.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def normalize_messages(messages: Any, where: str, key: str) -> Any:
    """``messages`` with ShareGPT turns and text-part contents mapped to ``{"role", "content"}``.

    A ShareGPT turn ``{"from": "human" | "gpt" | "system", "value": ...}`` becomes
    ``{"role": "user" | "assistant" | "system", "content": ...}``; a ``content`` that is a
    list of parts ``[{"type": "text", "text": ...}, ...]`` becomes the texts joined (with
    nothing between them, as chat templates render parts). Keys whose value is null (columns
    Arrow adds to every message of a dataset) are dropped. Anything else is returned as it
    is, for :func:`check_messages` to report.

    Args:
        messages: the row's value under ``key``.
        where: the row's location (``file:line``).
        key: the column, named in the errors.

    Raises:
        DataError: a ShareGPT speaker other than human, gpt or system, or a content part
            that is not text; naming the row and the message.
    """
    if not isinstance(messages, list):
        return messages
    normalized: list[Any] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            normalized.append(message)
            continue
        if message.get("role") is None and "from" in message:
            speaker = message["from"]
            if speaker not in SHAREGPT_ROLES:
                raise DataError(
                    f"{where}: {key}[{i}].from is {speaker!r}; ShareGPT speakers read are human, gpt and system"
                )
            rest = {k: v for k, v in message.items() if k not in ("from", "value")}
            message = {**rest, "role": SHAREGPT_ROLES[speaker], "content": message.get("value")}
        if isinstance(message.get("content"), list):
            message = {**message, "content": _text_of_parts(message["content"], where, f"{key}[{i}].content")}
        normalized.append({k: v for k, v in message.items() if v is not None or k in ("role", "content")})
    return normalized


def _text_of_parts(parts: list[Any], where: str, key: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"a {kind!r} part" if kind is not None else describe_type(part)
            raise DataError(
                f"{where}: {key}[{j}] is {what}; only text parts ({{'type': 'text', 'text': ...}}) are read"
            )
        texts.append(part["text"])
    return "".join(texts)


def check_messages(
    messages: Any, where: str, key: str, *, expected: str = "a list of messages", role: str | None = None
) -> list[dict[str, Any]]:
    """``messages`` (normalized) if it is a non-empty list of messages with string ``role`` and ``content``.

    ShareGPT turns and text-part contents are accepted (:func:`normalize_messages`); the
    list returned is in ``{"role", "content"}`` form.

    Args:
        messages: the row's value under ``key``.
        where: the row's location (``file:line``).
        key: the column, named in the errors.
        expected: what the column may hold, for the error when it is not a list
            (``"a string or a list of messages"`` where a plain string is also accepted).
        role: the role every message must have (``"assistant"`` for replies), or ``None``.

    Raises:
        DataError: naming the row and the message at fault.
    """
    messages = normalize_messages(messages, where, key)
    if not isinstance(messages, list):
        raise DataError(f"{where}: {key!r} must be {expected}, got {describe_type(messages)}")
    if not messages:
        raise DataError(f"{where}: {key!r} is an empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: {key}[{i}] must be an object with 'role' and 'content', got {describe_type(message)}"
            )
        for field in ("role", "content"):
            value = message.get(field)
            if not isinstance(value, str):
                raise DataError(f"{where}: {key}[{i}].{field} must be a string, got {describe_type(value)}")
        if role is not None and message["role"] != role:
            raise DataError(f"{where}: {key}[{i}] must be an {role} message, got role {message['role']!r}")
    return messages


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], where: str, generation_prompt: bool = False) -> str:
    """The text of ``messages`` under the tokenizer's chat template (not tokenized).

    Args:
        tokenizer: a tokenizer with a chat template.
        messages: checked messages (``check_messages``).
        where: the row's location, for the error.
        generation_prompt: end with the template's cue for the assistant's reply.

    Raises:
        DataError: the template raised on this conversation.
    """
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # templates raise whatever their authors chose (raise_exception, TypeError ...)
        raise DataError(f"{where}: the chat template failed on this conversation: {exc}") from None
