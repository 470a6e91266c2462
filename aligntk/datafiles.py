"""Reading rows from local data files, with the location of each row for error messages.

Every data component reads its files through :func:`read_rows`, so a bad row is always
reported the same way: ``data/train.jsonl:17: ...`` (a line) or ``data/train.parquet: row 5:
...`` (a row, for formats without lines). Rows are plain dicts; checking their shape is the
component's job.

Besides files, a folder written by Hugging Face ``datasets``' ``save_to_disk`` is read (a
``Dataset``, or one split of a ``DatasetDict``: ``data/hf:test`` names the split; rows are
``data/hf[test]: row 5``), and so is a ``.arrow`` file (as ``datasets`` writes them).

:func:`load_splits` also counts each file's unknown tokens (:func:`check_unknown_tokens`), so
text the tokenizer cannot encode is reported, and refused with ``max_unk_fraction``, the same
way for every file-based component.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, model_validator

from .errors import DataError
from .recipe import _resolve_path
from .types import ComponentConfig, DataReport, DataSplits, Example

log = logging.getLogger("aligntk")

#: File extensions :func:`read_rows` understands.
SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
#: The split :func:`read_rows` reads from a ``DatasetDict`` folder named without one.
DEFAULT_SPLIT = "train"


def split_path(path: Path) -> tuple[Path, str] | None:
    """``(folder, split)`` for a path written ``folder:split`` whose folder exists, else ``None``."""
    path = Path(path)
    if path.exists() or ":" not in path.name:
        return None
    name, _, split = path.name.rpartition(":")
    folder = path.with_name(name) if name else path
    return (folder, split) if name and split and folder.is_dir() else None


def with_split(path: Path, split: str | None) -> Path:
    """``path`` naming ``split`` of a ``save_to_disk`` folder (``folder:split``); ``path`` for ``None``.

    Raises:
        DataError: ``path`` is not a folder, or already names a split.
    """
    if split is None:
        return path
    if split_path(path) is not None:
        raise DataError(f"{path}: the path already names a split; give the split once (in the path or the option)")
    if not Path(path).is_dir():
        raise DataError(f"{path}: split {split!r} given, but only a datasets save_to_disk folder has splits")
    return Path(path).with_name(f"{Path(path).name}:{split}")


#: Rows handed over in memory (``aligntk.train``'s datasets), by the stand-in path a data config names.
_IN_MEMORY: dict[Path, tuple[str, Sequence[Any]]] = {}


@contextmanager
def in_memory_rows(name: str, rows: Sequence[Any]) -> Iterator[Path]:
    """A stand-in path under which :func:`read_rows` yields ``rows`` while the context lasts.

    The path (``/aligntk:in-memory/<name>``) goes into a data config's ``path`` like a file's,
    so the component reads the rows exactly as it reads a file's; each is named
    ``"<name>: row 5"`` (1-based) in messages. Nothing is written to disk.
    """
    path = Path("/aligntk:in-memory") / name
    if path in _IN_MEMORY:
        raise DataError(f"{name}: in-memory rows with this name are already in use")
    _IN_MEMORY[path] = (name, rows)
    try:
        yield path
    finally:
        del _IN_MEMORY[path]


def _read_in_memory(name: str, rows: Sequence[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{name}: row {i}: expected an object (a dict of fields), got {describe_type(row)}")
        yield f"{name}: row {i}", row


def _data_must_exist(value: Path) -> Path:
    if not value.exists() and split_path(value) is None and value not in _IN_MEMORY:
        raise ValueError(f"file not found: {value}")
    return value


#: A data file or ``save_to_disk`` folder in a recipe (``folder:split`` allowed), resolved like ``LocalFile``.
DataFile = Annotated[Path, AfterValidator(_resolve_path), AfterValidator(_data_must_exist)]


def read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, row)`` for every row of a local data file, in file order.

    ``where`` names the row for messages: ``"train.jsonl:17"`` (1-based line) for JSON Lines,
    ``"train.csv:12"`` (the header is line 1) for CSV, ``"train.json: row 5"`` for a JSON
    array of objects and ``"train.parquet: row 5"`` for Parquet (1-based rows).

    CSV values are always strings (an empty cell is ``""``): a completion ``4`` stays text.

    A ``save_to_disk`` folder's rows are ``"data/hf[train]: row 5"`` (a ``DatasetDict``: the
    split named ``data/hf:train``, ``train`` by default) or ``"data/hf: row 5"`` (a
    ``Dataset``); a ``.arrow`` file's are ``"train.arrow: row 5"``.

    Args:
        path: a ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` or ``.arrow`` file, or a
            ``save_to_disk`` folder (``folder:split`` for one split of a ``DatasetDict``).

    Raises:
        DataError: the file is missing, has an unknown extension, cannot be parsed, holds
            a row that is not an object, or has no rows; a folder that ``save_to_disk``
            did not write, or without the split. The message starts with the file (and
            line or row).
    """
    path = Path(path)
    named = split_path(path)
    if path in _IN_MEMORY:  # aligntk.train's in-memory dataset
        rows_of: Iterator[tuple[str, dict[str, Any]]] = _read_in_memory(*_IN_MEMORY[path])
    elif named is not None or path.is_dir():
        folder, split = named if named is not None else (path, None)
        rows_of = _read_saved(folder, split)  # a generator: reads when iterated
    else:
        suffix = path.suffix.lower()
        if suffix not in SUPPORTED_EXTENSIONS:
            raise DataError(
                f"{path}: unknown data file type {path.suffix or '(no extension)'!r}; "
                f"supported: {', '.join(SUPPORTED_EXTENSIONS)}, or a datasets save_to_disk folder"
            )
        if not path.is_file():
            raise DataError(f"{path}: data file not found")
        readers = {
            ".jsonl": _read_jsonl,
            ".json": _read_json,
            ".csv": _read_csv,
            ".parquet": _read_parquet,
            ".arrow": _read_arrow,
        }
        rows_of = readers[suffix](path)
    rows = 0
    try:
        for row in rows_of:
            rows += 1
            yield row
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if rows == 0:
        label = _IN_MEMORY[path][0] if path in _IN_MEMORY else path
        raise DataError(f"{label}: the file has no rows" if label is path else f"{label}: the dataset has no rows")


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
            yield where, _object(row, where)


def _read_json(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(rows, list):
        raise DataError(
            f"{path}: a .json data file holds a list of objects, got {describe_type(rows)} "
            "(use .jsonl for one object per line)"
        )
    for number, row in enumerate(rows, start=1):
        where = f"{path}: row {number}"
        yield where, _object(row, where)


def _read_csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    # The csv module rather than `datasets`: pandas would turn a completion "4" into an int,
    # and line numbers stay exact when a quoted cell spans several lines.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        while True:
            where = f"{path}:{reader.line_num + 1}"  # the line the next row starts on
            cells = next(reader, None)
            if cells is None:
                return
            if not cells:
                continue  # a blank line
            if len(cells) != len(header):
                raise DataError(f"{where}: {len(cells)} cells, but the header has {len(header)} columns")
            yield where, dict(zip(header, cells))


def _read_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets
    import pyarrow

    try:
        with _quiet_datasets() as cache_dir:
            table = datasets.load_dataset(
                "parquet", data_files=str(path), split="train", cache_dir=cache_dir, keep_in_memory=True
            )
    except (pyarrow.ArrowException, datasets.exceptions.DatasetGenerationError) as exc:
        cause = exc.__cause__ or exc
        raise DataError(f"{path}: not a readable Parquet file: {cause}") from None
    for number, row in enumerate(table, start=1):
        yield f"{path}: row {number}", row


def _read_arrow(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets
    import pyarrow

    try:
        table = datasets.Dataset.from_file(str(path), in_memory=True)
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Arrow file (as datasets writes them): {exc}") from None
    for number, row in enumerate(table, start=1):
        yield f"{path}: row {number}", row


def _read_saved(folder: Path, split: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """The rows of a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    import datasets

    is_dict = (folder / "dataset_dict.json").is_file()
    if not is_dict and not (folder / "state.json").is_file():
        raise DataError(
            f"{folder}: a folder, but not one written by datasets' save_to_disk (no dataset_dict.json or state.json)"
        )
    if not is_dict and split is not None:
        raise DataError(f"{folder}: holds one Dataset, without splits; name the folder without split {split!r}")
    try:
        with _quiet_datasets():
            loaded = datasets.load_from_disk(str(folder), keep_in_memory=True)
    except Exception as exc:  # datasets raises FileNotFoundError, arrow and JSON errors for a damaged folder
        raise DataError(f"{folder}: not a readable save_to_disk folder: {exc}") from None
    label = str(folder)
    if is_dict:
        split = split or DEFAULT_SPLIT
        if split not in loaded:
            raise DataError(
                f"{folder}: no split {split!r} (splits: {', '.join(loaded)}); name one as {folder}:SPLIT "
                "or with data.split / data.eval_split"
            )
        loaded, label = loaded[split], f"{folder}[{split}]"
    for number, row in enumerate(loaded, start=1):
        yield f"{label}: row {number}", row


@contextmanager
def _quiet_datasets() -> Iterator[str]:
    """A throw-away cache folder, and no progress bars, for one ``datasets.load_dataset`` call.

    The rows are kept in memory, so nothing is left in the user's Hugging Face cache.
    """
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="aligntk-data-") as cache_dir:
            yield cache_dir
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _object(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {describe_type(row)}")
    return row


def describe_type(value: Any) -> str:
    """A value's type in words a data file's author knows: ``object``, ``list``, ``null``, ``int`` ..."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


# --------------------------------------------------------------------------------------
# Train / eval splits shared by every file-based data component
# --------------------------------------------------------------------------------------


class FileDataConfig(ComponentConfig):
    """Options every file-based data component has; subclass it and add your own.

    Attributes:
        path: the training file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, ``.arrow``)
            or ``datasets`` ``save_to_disk`` folder (``folder:split`` picks a split).
        eval_path: an evaluation file in the same formats.
        split: the split of a ``DatasetDict`` folder ``path`` reads (default ``train``).
        eval_split: the split evaluation reads: of ``eval_path``'s folder, or without
            ``eval_path`` of ``path``'s (``eval_split: test``).
        eval_fraction: without ``eval_path``, the share of training rows held out for
            evaluation (a shuffle seeded with the run's seed picks them).
        max_unk_fraction: refuse a file whose share of unknown tokens (characters the
            tokenizer cannot encode) is above this; ``None`` only warns, above 1%.
    """

    path: DataFile
    eval_path: DataFile | None = None
    split: str | None = None
    eval_split: str | None = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    max_unk_fraction: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_eval_source(self) -> FileDataConfig:
        for name in ("eval_path", "eval_split"):
            if getattr(self, name) is not None and self.eval_fraction > 0:
                raise ValueError(f"give {name!r} or 'eval_fraction', not both")
        return self

    def train_source(self) -> Path:
        """What :func:`read_rows` reads for training: ``path``, with ``split`` if given."""
        return with_split(self.path, self.split)

    def eval_source(self) -> Path | None:
        """What :func:`read_rows` reads for evaluation, or ``None`` (none, or ``eval_fraction``)."""
        if self.eval_path is None and self.eval_split is None:
            return None
        return with_split(self.eval_path if self.eval_path is not None else self.path, self.eval_split)


def require_pad_token(tokenizer: Any) -> int:
    """The tokenizer's pad id, or a ``DataError`` that says how to name one in the recipe."""
    if tokenizer.pad_token_id is None:
        raise DataError("the tokenizer has no pad token; name one in the recipe, for example model.pad_token: '</s>'")
    return int(tokenizer.pad_token_id)


def load_splits(
    config: FileDataConfig, seed: int, read: Callable[[Path, DataReport], list[Example]], *, tokenizer: Any
) -> DataSplits:
    """Read the training file and the evaluation file (or hold out ``eval_fraction``).

    ``read(path, report)`` turns one file into examples and records skipped rows in ``report``.
    Each file's unknown tokens are counted (:func:`check_unknown_tokens`) before any hold-out.

    Args:
        config: the component's options.
        seed: the run's seed (for the ``eval_fraction`` shuffle).
        read: one file to examples.
        tokenizer: the tokenizer ``read`` uses; its ``unk_token_id`` is what is counted.

    Raises:
        DataError: from ``read``; too few rows to hold out; or a file with more unknown
            tokens than ``max_unk_fraction``.
    """
    report = DataReport()
    source, eval_source = config.train_source(), config.eval_source()
    train = read(source, report)
    check_unknown_tokens(source, train, tokenizer, report, config.max_unk_fraction)
    if eval_source is not None:
        eval_ = read(eval_source, report)
        check_unknown_tokens(eval_source, eval_, tokenizer, report, config.max_unk_fraction)
    elif config.eval_fraction > 0:
        train, eval_ = hold_out(train, config.eval_fraction, seed, source)
    else:
        eval_ = []
    report.rows = {"train": len(train), "eval": len(eval_)}
    return DataSplits(train=train, eval=eval_, report=report)


#: Above this share of unknown tokens a file is reported with a warning.
UNK_WARN_FRACTION = 0.01


def check_unknown_tokens(
    path: Path, examples: Sequence[Example], tokenizer: Any, report: DataReport, max_fraction: float | None = None
) -> None:
    """Count one file's unknown tokens into ``report.unknown_tokens``; warn or refuse if too many.

    A character the tokenizer cannot encode becomes its unknown token, which the model
    then learns to predict for everything it cannot read. The tokens counted are those of
    every example field whose name ends in ``input_ids`` (``input_ids``,
    ``chosen_input_ids``, ``rejected_input_ids`` ...), or ``prompt_ids`` in examples that
    have none (online data's prompts), after truncation: what training sees. A tokenizer without an unknown token (byte-level BPE) counts nothing.

    Args:
        path: the file the examples came from (the key in the report).
        examples: that file's examples.
        tokenizer: the tokenizer that encoded them.
        report: where the count goes.
        max_fraction: refuse above this share; ``None`` only warns (above 1%).

    Raises:
        DataError: the share is above ``max_fraction``; names the file and ``data.max_unk_fraction``.
    """
    unk_id = getattr(tokenizer, "unk_token_id", None)
    key = str(path)
    if unk_id is None or key in report.unknown_tokens:  # an eval_path equal to path is counted once
        return
    unknown = tokens = 0
    for example in examples:
        names = [n for n in example if n.endswith("input_ids")] or [n for n in ("prompt_ids",) if n in example]
        for ids in (example[n] for n in names):
            ids = ids if isinstance(ids, list) else list(ids)
            unknown += ids.count(unk_id)
            tokens += len(ids)
    report.unknown_tokens[key] = {"unknown": unknown, "tokens": tokens}
    fraction = unknown / tokens if tokens else 0.0
    if max_fraction is not None and fraction > max_fraction:
        raise DataError(
            f"{path}: {fraction:.1%} of tokens are unknown ({tokenizer.unk_token!r}), above data.max_unk_fraction "
            f"{max_fraction:g}; the tokenizer cannot encode this data (use a tokenizer that covers its characters)"
        )
    if fraction > UNK_WARN_FRACTION:
        log.warning(
            "data: %s: %.1f%% of tokens are the unknown token %r (%d of %d); "
            "the tokenizer cannot encode some characters",
            path,
            100 * fraction,
            tokenizer.unk_token,
            unknown,
            tokens,
        )


def keep_fitting(path: Path, fitted: list[Example | None], skipped: DataReport, report: DataReport) -> list[Example]:
    """The examples that survived truncation; the skips go into ``report``; none left is an error."""
    examples = [e for e in fitted if e is not None]
    if not examples:
        reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.skipped.items())
        raise DataError(f"{path}: every row was skipped ({reasons})")
    for reason, n in skipped.skipped.items():
        report.skip(reason, n)
    return examples


def hold_out(examples: list[Example], fraction: float, seed: int, path: Path) -> tuple[list[Example], list[Example]]:
    """Split off ``fraction`` of the examples (at least one) by a seeded shuffle; both keep file order."""
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise DataError(
            f"{path}: {len(examples)} usable rows are too few to hold out eval_fraction {fraction} "
            "and keep some for training"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    eval_ = [e for i, e in enumerate(examples) if i in held]
    return train, eval_
