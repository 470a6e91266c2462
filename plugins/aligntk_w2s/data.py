"""Classification data for weak-to-strong runs: text and an integer label per row.

Each example carries the ground-truth class (``label``, for accuracy) and a target
distribution (``soft_labels``): one-hot from the label, or the weak supervisor's
probabilities read from a labels file written by an earlier labelling step
(``soft_labels_path``). The student's run reads that file; the teacher never runs in it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, PositiveInt

from aligntk import (
    Batch,
    DataContext,
    DataError,
    DataReport,
    DataSplits,
    Example,
    FileDataConfig,
    LocalFile,
    describe_type,
    load_splits,
    pad_tokens,
    read_rows,
    require_pad_token,
)

#: Batch fields the ``classification`` component provides.
CLASSIFICATION_PROVIDES = frozenset({"input_ids", "attention_mask", "soft_labels", "labels_int"})


class ClassificationDataConfig(FileDataConfig):
    """Options of the ``classification`` data component (with ``path``, ``eval_path``,
    ``eval_fraction``, ``max_unk_fraction``).

    Attributes:
        text_key: the column holding the text.
        label_key: the column holding the class, an integer in ``[0, num_classes)``.
        num_classes: the number of classes ``C``.
        max_length: the most tokens kept per text (longer texts are cut at the end).
        label_tokens: classify with a causal LM instead of a classification head: one
            single-token string per class (for example ``["no", "yes"]``); the class
            logits are the LM's next-token logits for these tokens after the text.
        soft_labels_path: a labels file (JSON Lines of ``{"index": i, "probs": [...]}``, or
            ``{"probs": [...]}`` aligned with the training rows) whose probabilities replace
            the ground truth as training targets. ``label`` keeps the ground truth.
    """

    text_key: str = "text"
    label_key: str = "label"
    num_classes: int = Field(2, ge=2)
    max_length: PositiveInt = 128
    soft_labels_path: LocalFile | None = None
    label_tokens: list[str] | None = None

    not_encoding = FileDataConfig.not_encoding | {"soft_labels_path"}  # applied after the cache


def read_examples(path: Path, text_key: str, label_key: str, num_classes: int) -> list[tuple[str, str, int]]:
    """``(where, text, label)`` for every row of a classification file.

    Raises:
        DataError: a row lacks a string text or an integer label in range (names file:line).
    """
    return [(where, *check_row(where, row, text_key, label_key, num_classes)) for where, row in read_rows(path)]


def check_row(where: str, row: dict[str, Any], text_key: str, label_key: str, num_classes: int) -> tuple[str, int]:
    """``(text, label)`` of one classification row.

    Raises:
        DataError: the row lacks a string text or an integer label in range (names ``where``).
    """
    text, label = row.get(text_key), row.get(label_key)
    if not isinstance(text, str):
        raise DataError(f"{where}: {text_key!r} must be a string, got {describe_type(text)}")
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():  # CSV cells are text
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f"{where}: {label_key!r} must be an integer class, got {describe_type(label)}")
    if not 0 <= label < num_classes:
        raise DataError(f"{where}: {label_key!r} is {label}, outside [0, {num_classes}) (num_classes {num_classes})")
    return text, label


def read_soft_labels(path: Path, n_rows: int, num_classes: int) -> list[list[float]]:
    """The probabilities of a labels file, one list of ``num_classes`` floats per training row.

    Rows either all carry ``index`` (any order, each training row exactly once) or none
    does (then row ``i`` of the file labels training row ``i``).

    Raises:
        DataError: a row is malformed, an index is out of range or repeated, or a
            training row has no label (the message names file:line).
    """
    probs: list[list[float] | None] = [None] * n_rows
    indexed: bool | None = None
    position = 0
    for where, row in read_rows(path):
        has_index = "index" in row
        if indexed is None:
            indexed = has_index
        elif indexed != has_index:
            raise DataError(f"{where}: mixes rows with and without 'index'; use one or the other")
        index = row["index"] if has_index else position
        position += 1
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_rows:
            raise DataError(f"{where}: 'index' must be an integer in [0, {n_rows}) (the training rows), got {index!r}")
        if probs[index] is not None:
            raise DataError(f"{where}: training row {index} is labelled twice")
        probs[index] = _check_probs(row.get("probs"), where, num_classes)
    missing = [i for i, p in enumerate(probs) if p is None]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} of {n_rows} training rows have no soft label (first: row {missing[0]}); "
            "the labels file must come from labelling this training file"
        )
    return [p for p in probs if p is not None]


def _check_probs(value: Any, where: str, num_classes: int) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise DataError(f"{where}: 'probs' must be a list of numbers, got {describe_type(value)}")
    if len(value) != num_classes:
        raise DataError(f"{where}: 'probs' has {len(value)} entries, expected num_classes {num_classes}")
    if any(v < 0 or not math.isfinite(v) for v in value) or not math.isclose(sum(value), 1.0, abs_tol=1e-3):
        raise DataError(f"{where}: 'probs' must be non-negative and sum to 1, got {value}")
    return [float(v) for v in value]


def collate_classification(examples: Sequence[Example], pad_token_id: int) -> Batch:
    """Right-pad examples into a batch.

    Returns:
        ``input_ids``, ``attention_mask`` ``[N, T]`` (long), ``soft_labels`` ``[N, C]``
        (float32) and ``labels_int`` ``[N]`` (long, the ground truth).
    """
    batch = pad_tokens([ex["input_ids"] for ex in examples], pad_token_id)
    batch["soft_labels"] = torch.tensor([ex["soft_labels"] for ex in examples], dtype=torch.float32)
    batch["labels_int"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
    if "label_token_ids" in examples[0]:
        batch["label_token_ids"] = torch.tensor([ex["label_token_ids"] for ex in examples], dtype=torch.long)
    return batch


class ClassificationData:
    """Text classification rows, tokenized, with one-hot or soft-label targets.

    Each example is ``{"input_ids", "soft_labels", "label", "index"}``; ``index`` is the
    row's position in its file (what a labels file refers to).
    """

    Config = ClassificationDataConfig
    provides = CLASSIFICATION_PROVIDES

    def __init__(self, config: ClassificationDataConfig):
        self.config = config
        self.pad_token_id = 0

    def load(self, ctx: DataContext) -> DataSplits:
        """Read and tokenize the training (and evaluation) rows.

        Raises:
            DataError: a file or row is bad (the message names file and line), or the
                tokenizer has no pad token.
        """
        c = self.config
        self.pad_token_id = require_pad_token(ctx.tokenizer)
        self.label_token_ids = self._label_token_ids(ctx.tokenizer)
        # Two stages, as two passes over a file: every row is checked before any is tokenized.
        stages = (self._check_row, functools.partial(self._encode_row, ctx.tokenizer))
        return load_splits(c, ctx.seed, encode=stages, finish=self._finish, tokenizer=ctx.tokenizer)

    def _label_token_ids(self, tokenizer: Any) -> list[int] | None:
        tokens = self.config.label_tokens
        if tokens is None:
            return None
        if len(tokens) != self.config.num_classes:
            raise DataError(f"data.label_tokens: {len(tokens)} tokens for {self.config.num_classes} classes")
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in tokens]
        bad = [t for t, i in zip(tokens, ids) if len(i) != 1]
        if bad:
            raise DataError(f"data.label_tokens: {bad} are not single tokens for this tokenizer")
        return [i[0] for i in ids]

    def _check_row(self, where: str, row: dict[str, Any], report: DataReport) -> tuple[str, int]:
        c = self.config
        return check_row(where, row, c.text_key, c.label_key, c.num_classes)

    def _encode_row(self, tokenizer: Any, where: str, checked: tuple[str, int], report: DataReport) -> Example:
        text, label = checked
        ids = tokenizer(text, truncation=True, max_length=self.config.max_length)["input_ids"]
        if not ids:
            raise DataError(f"{where}: the text has no tokens")
        one_hot = [0.0] * self.config.num_classes
        one_hot[label] = 1.0
        example = {"input_ids": list(ids), "soft_labels": one_hot, "label": label, "index": None}  # index: _finish
        if self.label_token_ids is not None:
            example["label_token_ids"] = self.label_token_ids
        return example

    def _finish(self, path: Path, examples: list[Example]) -> list[Example]:
        """Each example's position in its file (``index``), and the training file's soft labels."""
        c = self.config
        for index, example in enumerate(examples):
            example["index"] = index
        if path == c.path and c.soft_labels_path is not None:  # aligned with the training file's rows
            soft = read_soft_labels(c.soft_labels_path, len(examples), c.num_classes)
            for example, probs in zip(examples, soft):
                example["soft_labels"] = probs
        return examples

    def collate(self, examples: Sequence[Example]) -> Batch:
        return collate_classification(examples, self.pad_token_id)
