"""Reading the answer out of a generated text: which of a fixed set of choices it names.

A chat model asked "positive or negative?" rarely answers with the bare word; it says
``The word "dismal" is negative.``. :func:`named_choice` finds the choice a text names as
a whole word, ignoring case, and returns ``None`` when it names none or more than one (a
hedge such as "positive or negative" is no answer). The ``choice`` reward (rl plugin) and
the ``choice_match`` evaluator (eval plugin) both score with it, so training and
evaluation grade an answer by the same rule.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def named_choice(text: str, choices: Sequence[str]) -> str | None:
    """The one choice that ``text`` names as a whole word (case ignored), else ``None``.

    Args:
        text: a generated answer.
        choices: the possible answers, such as ``["positive", "negative"]``; each may be
            several words (``"no opinion"``) and matches only at word boundaries.

    Returns:
        The choice, spelled as in ``choices``, when exactly one of them occurs in ``text``;
        ``None`` when none or several do.

    Example:
        >>> named_choice('The word "dismal" is Negative.', ["positive", "negative"])
        'negative'
        >>> named_choice("positive or negative", ["positive", "negative"]) is None
        True
    """
    found = [c for c in choices if re.search(rf"(?<!\w){re.escape(c)}(?!\w)", text, flags=re.IGNORECASE)]
    return found[0] if len(found) == 1 else None
