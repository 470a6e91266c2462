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

A component that hands :func:`load_splits` per-row stages (``encode=``) instead of a whole-file
``read`` gets two more things: the rows are encoded in several processes (``datasets.map`` with
``num_proc``), and each file's encoded examples are cached on disk under a hash of everything
that decides them (the data, the tokenizer's full serialization, the component's options and
code), so a second run over the same data reads them back instead of tokenizing again.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import inspect
import json
import logging
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, PositiveInt, model_validator

from .errors import DataError
from .recipe import LocalPath, _resolve_path
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
        num_proc: processes that encode a file's rows (``datasets.map``); ``auto`` is one
            for files under 20,000 rows, else the CPUs this process may use (divided among
            ``torchrun``'s local ranks), at most 8. Examples are the same for any value.
        cache: keep each file's encoded examples on disk and read them back when the data,
            tokenizer, encoding options and code are the same (components that give
            :func:`load_splits` per-row stages).
        cache_dir: where; ``None`` is ``$ALIGNTK_CACHE/tokenized``, else
            ``~/.cache/aligntk/tokenized`` (``$XDG_CACHE_HOME/aligntk/tokenized``).

    A subclass names its options that do not change what a row encodes to (used only when
    batching, say) in ``not_encoding``, so changing them keeps the cache.
    """

    #: Options left out of the tokenization cache's key: they never change an encoded example.
    not_encoding: ClassVar[frozenset[str]] = frozenset(
        {"path", "eval_path", "split", "eval_split", "eval_fraction", "max_unk_fraction", "num_proc", "cache", "cache_dir"}
    )

    path: DataFile
    eval_path: DataFile | None = None
    split: str | None = None
    eval_split: str | None = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    max_unk_fraction: float | None = Field(None, ge=0.0, le=1.0)
    num_proc: PositiveInt | Literal["auto"] = "auto"
    cache: bool = True
    cache_dir: LocalPath | None = None

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


#: One stage of turning a row into an example, called ``stage(where, value, report)``: the first
#: stage gets the row (a dict), each later one what the stage before returned, and the last
#: returns the example. A stage that returns ``None`` skips the row (say why with
#: ``report.skip``); one that raises ``DataError`` names the row (``where``) in the message.
RowStage = Callable[[str, Any, DataReport], Any]


def load_splits(
    config: FileDataConfig,
    seed: int,
    read: Callable[[Path, DataReport], list[Example]] | None = None,
    *,
    tokenizer: Any,
    encode: RowStage | Sequence[RowStage] | None = None,
    finish: Callable[[Path, list[Example]], list[Example]] | None = None,
) -> DataSplits:
    """Read the training file and the evaluation file (or hold out ``eval_fraction``).

    Give either ``read(path, report)``, which turns one file into examples and records
    skipped rows in ``report``, or ``encode``: the stages that turn one row into an example
    (:data:`RowStage`). With stages the rows are encoded in ``config.num_proc`` processes and
    each file's examples are cached (``config.cache``, :func:`encode_file`); the examples,
    the report and any error are the same as reading the file with the stages in one
    process, each stage over every row before the next. ``finish(path, examples)`` then
    sees each file's examples, cached or not (to add what does not come from the row: its
    position, labels from another file), with ``read`` too. Each file's unknown tokens are counted
    (:func:`check_unknown_tokens`) before any hold-out.

    Args:
        config: the component's options.
        seed: the run's seed (for the ``eval_fraction`` shuffle).
        read: one file to examples.
        tokenizer: the tokenizer the component encodes with; its ``unk_token_id`` is what is
            counted, and with ``encode`` its serialization is part of the cache key.
        encode: one row to one example, in stages (picklable, to reach other processes).
        finish: each file's examples, after ``read`` or ``encode``.

    Raises:
        DataError: from ``read`` or the stages (the first bad row, as one process would
            find it); every row skipped; too few rows to hold out; or a file with more
            unknown tokens than ``max_unk_fraction``.
    """
    if (read is None) == (encode is None):
        raise TypeError("load_splits: give either read or encode")
    if encode is not None:
        stages = (encode,) if callable(encode) else tuple(encode)
        keys = _KeyParts(config, stages, tokenizer)

        def read(path: Path, report: DataReport) -> list[Example]:
            return encode_file(path, stages, config, tokenizer, report, keys=keys)

    def examples_of(path: Path, report: DataReport) -> list[Example]:
        examples = read(path, report)
        return finish(path, examples) if finish is not None else examples

    report = DataReport()
    source, eval_source = config.train_source(), config.eval_source()
    train = examples_of(source, report)
    check_unknown_tokens(source, train, tokenizer, report, config.max_unk_fraction)
    if eval_source is not None:
        eval_ = examples_of(eval_source, report)
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


# --------------------------------------------------------------------------------------
# Encoding rows: in several processes, cached by a hash of what decides the examples
# --------------------------------------------------------------------------------------

#: The layout of a cache entry; bump it when that, or what goes into the key, changes.
CACHE_FORMAT = 2  # 2: examples.json (1 was a pickle)
#: With ``num_proc: auto``, a file with fewer rows is encoded in this process (starting
#: workers and sending them the tokenizer costs about a second).
AUTO_MIN_ROWS = 20_000
#: With ``num_proc: auto``, at most this many processes.
AUTO_MAX_PROC = 8
#: The aligntk modules whose code encodes rows besides the component's own (hashed into the key).
_ENCODING_MODULES = ("datafiles", "chat", "sequences", "types")


def tokenized_cache_dir() -> Path:
    """The default ``cache_dir``: ``$ALIGNTK_CACHE/tokenized``, else ``~/.cache/aligntk/tokenized``.

    ``$XDG_CACHE_HOME`` replaces ``~/.cache`` where it is set.
    """
    root = os.environ.get("ALIGNTK_CACHE")
    if root:
        return Path(root).expanduser() / "tokenized"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "aligntk" / "tokenized"


def resolve_num_proc(num_proc: int | str, rows: int) -> int:
    """The processes to encode ``rows`` rows with: ``num_proc``, or for ``auto`` see :class:`FileDataConfig`."""
    if num_proc == "auto":
        if rows < AUTO_MIN_ROWS:
            return 1
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = os.cpu_count() or 1
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        return max(1, min(AUTO_MAX_PROC, cpus // max(1, local_ranks)))
    return max(1, min(int(num_proc), rows))


def encode_file(
    path: Path,
    stages: Sequence[RowStage],
    config: FileDataConfig,
    tokenizer: Any,
    report: DataReport,
    *,
    keys: _KeyParts | None = None,
) -> list[Example]:
    """One file's examples: from the cache, or read, encoded by ``stages`` and cached.

    Skipped rows are counted into ``report`` (the same counts, in the same order, from the
    cache). A bad row raises before anything is cached, so an error is never cached.

    Raises:
        DataError: the first bad row (:func:`read_rows` or a stage), or every row skipped.
    """
    keys = keys or _KeyParts(config, stages, tokenizer)
    entry = keys.entry(path) if config.cache else None
    if entry is not None:
        cached = _read_entry(entry, path)
        if cached is not None:
            examples, skipped = cached
            for reason, n in skipped.items():
                report.skip(reason, n)
            log.info("data: %s: %d examples from the tokenization cache (%s)", path, len(examples), entry)
            return examples
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    wheres: list[str] = []
    read_error: DataError | None = None
    try:
        for where, row in read_rows(path):
            wheres.append(where)
            rows.append(row)
    except DataError as exc:  # reported after any earlier row's first-stage error, as one pass would
        read_error = exc
    num_proc = resolve_num_proc(config.num_proc, len(rows))
    # A file that did not read needs only its first stage (an earlier row's error there wins).
    todo = stages[:1] if read_error is not None else stages
    if num_proc > 1 and not _can_send(todo):
        num_proc = 1
    if num_proc > 1:
        fitted, skipped, error = _encode_in_processes(todo, wheres, rows, num_proc)
    else:
        fitted, skipped, error = _run_stages(todo, wheres, rows, 0)
    if error is not None and (read_error is None or error[0] == 0):
        raise error[2] from None  # the stage's DataError, message as raised (file and row)
    if read_error is not None:
        raise read_error from None
    found = DataReport(skipped=skipped)
    examples = keep_fitting(path, fitted, found, report)
    log.debug(
        "data: %s: encoded %d rows in %.2f s (%d process%s)",
        path, len(rows), time.perf_counter() - started, num_proc, "es" if num_proc > 1 else "",
    )
    if entry is not None:
        _write_entry(entry, examples, skipped, path)
    return examples


_StageResult = tuple[list[Any], dict[str, int], tuple[int, int, DataError] | None]


def _run_stages(stages: Sequence[RowStage], wheres: Sequence[str], rows: Sequence[Any], offset: int) -> _StageResult:
    """Each row through the stages, in order: ``(examples or None, skips by reason, first error)``.

    The first error is the one with the lowest ``(stage, row)``: what running each stage over
    every row before the next would raise. Once a row fails at stage ``k``, later rows only go
    through the stages before ``k`` (only an error there could come first).
    """
    out: list[Any] = []
    report = DataReport()
    error: tuple[int, int, DataError] | None = None
    limit = len(stages)
    for i, (where, value) in enumerate(zip(wheres, rows)):
        if limit == 0:
            break
        for k, stage in enumerate(stages[:limit]):
            try:
                value = stage(where, value, report)
            except DataError as exc:
                error, limit = (k, offset + i, exc), k
                value = None
                break
            if value is None:
                break
        out.append(value)
    return out, report.skipped, error


def _encode_batch(stages: Sequence[RowStage], batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[bytes]]:
    """``datasets.map``'s function: a batch of pickled rows to one pickled ``_StageResult``."""
    rows = [pickle.loads(blob) for blob in batch["row"]]
    result = _run_stages(stages, batch["where"], rows, indices[0])
    return {"result": [pickle.dumps((indices[0], result), protocol=pickle.HIGHEST_PROTOCOL)]}


def _encode_in_processes(
    stages: Sequence[RowStage], wheres: list[str], rows: list[dict[str, Any]], num_proc: int
) -> _StageResult:
    """:func:`_run_stages` over contiguous shards of the rows in ``num_proc`` processes, joined in row order."""
    import datasets

    payload = datasets.Dataset.from_dict(
        {"where": wheres, "row": [pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL) for row in rows]}
    )
    batch_size = max(64, min(1000, -(-len(rows) // (4 * num_proc))))
    with _no_progress_bars(), _tokenizers_quiet_after_fork():
        mapped = payload.map(
            functools.partial(_encode_batch, tuple(stages)),
            batched=True,
            batch_size=batch_size,
            with_indices=True,
            num_proc=num_proc,
            remove_columns=payload.column_names,
            keep_in_memory=True,
            load_from_cache_file=False,
            new_fingerprint=hashlib.sha256(os.urandom(16)).hexdigest()[:16],  # nothing for datasets to hash
        )
    parts = sorted((pickle.loads(blob) for blob in mapped["result"]), key=lambda part: part[0])
    fitted: list[Any] = []
    report = DataReport()
    errors = []
    for _, (out, skipped, error) in parts:
        fitted += out
        for reason, n in skipped.items():
            report.skip(reason, n)
        if error is not None:
            errors.append(error)
    return fitted, report.skipped, min(errors, key=lambda e: e[:2]) if errors else None


def _can_send(stages: Sequence[RowStage]) -> bool:
    """Whether the stages (and the tokenizer they hold) pickle, to reach worker processes."""
    import dill

    try:
        dill.dumps(tuple(stages))
    except Exception as exc:  # anything dill cannot pickle, in whatever way it fails
        log.warning("data: the row encoder cannot be sent to other processes (%s); encoding in this one", exc)
        return False
    return True


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


@contextmanager
def _tokenizers_quiet_after_fork() -> Iterator[None]:
    """No "process just got forked" warning from ``tokenizers`` in the workers (each encodes serially)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    if before is None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)


# ---- the cache key ----------------------------------------------------------------------


class _KeyParts:
    """What goes into a file's cache key, worked out once for a component's train and eval files.

    The key hashes: the data (each file's bytes, every file of a ``save_to_disk`` folder, or
    in-memory rows pickled) and where it is (``where`` strings go to the stages); the
    tokenizer's full serialization (``save_pretrained``: vocabulary, merges, chat template,
    special tokens); the config's class and every option not in ``not_encoding``; the source
    of the modules defining the stages and of aligntk's encoding helpers; and the versions of
    aligntk, transformers, tokenizers and jinja2. The seed is not in it: encoding never uses it.
    """

    def __init__(self, config: FileDataConfig, stages: Sequence[RowStage], tokenizer: Any):
        self.config, self.stages, self.tokenizer = config, tuple(stages), tokenizer
        self._common: str | None = None
        self._worked_out = False

    def entry(self, path: Path) -> Path | None:
        """The cache folder for ``path``'s examples, or ``None`` where no key can be made."""
        common = self._common_digest()
        data = _data_digest(path) if common is not None else None
        if common is None or data is None:
            return None
        key = hashlib.sha256(f"{common}\n{path}\n{data}".encode()).hexdigest()
        root = self.config.cache_dir if self.config.cache_dir is not None else tokenized_cache_dir()
        return Path(root) / key

    def _common_digest(self) -> str | None:
        if not self._worked_out:
            self._worked_out = True
            try:
                c = self.config
                options = c.model_dump(mode="json", exclude=set(type(c).not_encoding))
                document = {
                    "format": CACHE_FORMAT,
                    "config": f"{type(c).__module__}.{type(c).__qualname__}",
                    "options": options,
                    "stages": [_qualname(stage) for stage in self.stages],
                    "code": _code_digest(self.stages),
                    "tokenizer": _tokenizer_digest(self.tokenizer),
                    "versions": _versions(),
                }
                text = json.dumps(document, sort_keys=True, default=str)
                self._common = hashlib.sha256(text.encode()).hexdigest()
            except Exception as exc:  # a tokenizer that cannot be saved, an option that cannot be dumped ...
                log.warning("data: no tokenization cache for this data (%s: %s)", type(exc).__name__, exc)
        return self._common


def _unwrap(stage: Any) -> Any:
    while isinstance(stage, functools.partial):
        stage = stage.func
    return getattr(stage, "__func__", stage)


def _qualname(stage: Any) -> str:
    fn = _unwrap(stage)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _code_digest(stages: Sequence[RowStage]) -> str:
    """A hash of the source files of the stages' modules and aligntk's encoding helpers."""
    files = {Path(sys.modules[f"{__package__}.{name}"].__file__) for name in _ENCODING_MODULES}
    for stage in stages:
        fn = _unwrap(stage)
        module = inspect.getmodule(fn if inspect.isroutine(fn) else type(fn))
        source = inspect.getsourcefile(module) if module is not None else None
        if source is None:
            raise ValueError(f"no source file for {_qualname(stage)}")
        files.add(Path(source))
    h = hashlib.sha256()
    for file in sorted(files):
        h.update(f"{file.name}\n".encode())
        h.update(file.read_bytes())
    return h.hexdigest()


def _tokenizer_digest(tokenizer: Any) -> str:
    """A hash of everything ``save_pretrained`` writes for the tokenizer, and its class."""
    h = hashlib.sha256(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}\n".encode())
    with tempfile.TemporaryDirectory(prefix="aligntk-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        for file in sorted(Path(folder).rglob("*")):
            if file.is_file():
                h.update(f"{file.relative_to(folder)}\n".encode())
                h.update(_without_call_state(file) if file.name == "tokenizer.json" else file.read_bytes())
    return h.hexdigest()


def _without_call_state(file: Path) -> bytes:
    """``tokenizer.json`` less its truncation and padding: state the last call left, which each call sets anew."""
    serialized = json.loads(file.read_text(encoding="utf-8"))
    if isinstance(serialized, dict):
        serialized.pop("truncation", None)
        serialized.pop("padding", None)
    return json.dumps(serialized, sort_keys=True).encode()


def _versions() -> dict[str, str]:
    import jinja2
    import tokenizers
    import transformers

    return {
        "aligntk": str(getattr(sys.modules.get(__package__), "__version__", "")),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "jinja2": jinja2.__version__,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def _data_digest(path: Path) -> str | None:
    """A hash of the data ``read_rows(path)`` reads, or ``None`` (unreadable: ``read_rows`` will say why)."""
    h = hashlib.sha256()
    try:
        if path in _IN_MEMORY:
            for row in _IN_MEMORY[path][1]:
                h.update(pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL))
            return "rows:" + h.hexdigest()
        named = split_path(path)
        folder = named[0] if named is not None else path
        files = sorted(f for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else [folder]
        for file in files:
            h.update(f"{file.relative_to(folder) if file != folder else file.name}\n".encode())
            with file.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    except (OSError, pickle.PicklingError, TypeError, AttributeError):
        return None
    return "files:" + h.hexdigest()


# ---- cache entries: a folder holding the examples and what the report needs --------------


def _to_json(value: Any) -> Any:
    """``value`` as JSON-able data that :func:`_from_json` turns back into an equal value.

    Cache entries are JSON, never pickles: reading a cache folder can run no code. Tuples are
    tagged; anything but plain data (a tensor, a non-string dict key) is a ``TypeError``, and
    that file is then not cached.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        if "__tuple__" in value:
            raise TypeError("a dict with the key '__tuple__' cannot be cached")
        return {k: _to_json(v) for k, v in value.items()}
    raise TypeError(f"a {type(value).__name__} in an example cannot be cached as JSON")


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _read_entry(entry: Path, path: Path) -> tuple[list[Example], dict[str, int]] | None:
    """The examples and skip counts in ``entry``, or ``None``: none there, or damaged (removed)."""
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "entry.json").read_text(encoding="utf-8"))
        blob = (entry / "examples.json").read_bytes()
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {CACHE_FORMAT}")
        if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise ValueError("the examples do not match their checksum")
        examples = _from_json(json.loads(blob))
        if not isinstance(examples, list) or len(examples) != meta["examples"]:
            raise ValueError("the number of examples is not the one recorded")
        skipped = {str(reason): int(n) for reason, n in meta["skipped"].items()}
    except Exception as exc:  # a torn or edited entry: whatever it is, encode again
        log.warning("data: %s: ignoring a damaged tokenization cache entry %s (%s); encoding again", path, entry, exc)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return examples, skipped


def _write_entry(entry: Path, examples: list[Example], skipped: dict[str, int], path: Path) -> None:
    """Write ``entry`` atomically: into a temporary folder beside it, then renamed."""
    tmp: Path | None = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
        blob = json.dumps(_to_json(examples), separators=(",", ":")).encode("utf-8")
        (tmp / "examples.json").write_bytes(blob)
        meta = {
            "format": CACHE_FORMAT,
            "source": str(path),
            "examples": len(examples),
            "skipped": skipped,
            "sha256": hashlib.sha256(blob).hexdigest(),
        }
        (tmp / "entry.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():
                raise
            # another process wrote the same entry first: theirs is as good as ours
        else:
            tmp = None
    except (OSError, pickle.PicklingError, TypeError, AttributeError) as exc:
        log.warning("data: %s: could not write the tokenization cache entry %s (%s)", path, entry, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
