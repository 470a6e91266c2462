"""Chat rows: checking a list of messages, and rendering it with the tokenizer's chat template.

A message is ``{"role": str, "content": str}``. Data components check a row's messages
with :func:`check_messages` (then add the role rules of their format) and render them
with :func:`render_chat`, so a bad conversation is reported the same way everywhere:
``data/train.jsonl:3: messages[1].content must be a string, got null``.
"""

from __future__ import annotations

from typing import Any

from .datafiles import describe_type
from .errors import DataError


def check_messages(
    messages: Any, where: str, key: str, *, expected: str = "a list of messages", role: str | None = None
) -> list[dict[str, Any]]:
    """``messages`` if it is a non-empty list of messages with string ``role`` and ``content``.

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
