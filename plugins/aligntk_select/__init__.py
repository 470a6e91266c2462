"""Data selection by small models: ``aligntk select``.

Scores every row of a dataset with a small model (completion perplexity, instruction-following
difficulty, a reward model's score, or learnability: the loss gap between a weak and a
stronger model; for text-classification rows, a classifier's confidence or the loss of the
row's hard or soft label), keeps the top-k, a fraction or a threshold, and writes the kept rows
(``kept.jsonl``, a plain data file any data component's ``path:`` reads), the scores and a
report with a histogram. See docs/select.md.
"""

from __future__ import annotations

from typing import Any

from aligntk import hookimpl

__all__ = ["aligntk_register_commands"]


@hookimpl
def aligntk_register_commands(cli: Any) -> None:
    from .command import select

    cli.add_command(select)
