"""aligntk.datafiles on its own: rows and their locations per format, hold-out, the shared options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from aligntk import DataError
from aligntk.datafiles import FileDataConfig, hold_out, keep_fitting, read_rows
from aligntk.types import DataReport

ROWS = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}]


def test_jsonl_rows_are_named_by_line_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert list(read_rows(path)) == [(f"{path}:1", ROWS[0]), (f"{path}:3", ROWS[1])]


def test_json_rows_are_named_by_row(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    assert list(read_rows(path)) == [(f"{path}: row 1", ROWS[0]), (f"{path}: row 2", ROWS[1])]


def test_csv_rows_are_named_by_the_line_they_start_on_and_stay_strings(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('prompt,completion\n1+1=,2\n"two\nlines",4\n\n3+3=,\n', encoding="utf-8")
    assert list(read_rows(path)) == [
        (f"{path}:2", {"prompt": "1+1=", "completion": "2"}),  # "2" stays text
        (f"{path}:3", {"prompt": "two\nlines", "completion": "4"}),
        (f"{path}:6", {"prompt": "3+3=", "completion": ""}),  # after a blank line; an empty cell is ""
    ]


def test_parquet_rows_are_named_by_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert list(read_rows(path)) == [(f"{path}: row 1", ROWS[0]), (f"{path}: row 2", ROWS[1])]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.jsonl", '{"a": 1}\n{"a": }\n', "{path}:2: not valid JSON: Expecting value (column 7)"),
        ("a.jsonl", '{"a": 1}\n[1, 2]\n', "{path}:2: expected a JSON object, got list"),
        ("a.jsonl", "\n\n", "{path}: the file has no rows"),
        ("a.json", '{"a": 1}',
         "{path}: a .json data file holds a list of objects, got object (use .jsonl for one object per line)"),
        ("a.json", '[{"a": 1}, null]', "{path}: row 2: expected a JSON object, got null"),
        ("a.csv", "a,b\n1,2\n3\n", "{path}:3: 1 cells, but the header has 2 columns"),
        ("a.txt", "hello", "{path}: unknown data file type '.txt'; supported: .jsonl, .json, .csv, .parquet, .arrow, or a datasets save_to_disk folder"),
    ],
)
def test_bad_files_are_one_error_naming_file_and_line(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(read_rows(path))
    assert str(info.value) == message.format(path=path)


def test_a_missing_file_and_non_utf8_text(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.jsonl: data file not found$"):
        list(read_rows(tmp_path / "missing.jsonl"))
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"a": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl: not UTF-8 text \(invalid continuation byte at byte 10\)$"):
        list(read_rows(path))


def test_hold_out_is_seeded_sized_and_keeps_file_order(tmp_path: Path) -> None:
    examples = [{"i": i} for i in range(20)]
    train, eval_ = hold_out(examples, 0.25, seed=3, path=tmp_path / "x.jsonl")
    assert (len(train), len(eval_)) == (15, 5)
    assert sorted(e["i"] for e in train + eval_) == list(range(20))  # a partition
    assert [e["i"] for e in eval_] == sorted(e["i"] for e in eval_)  # file order kept
    assert [e["i"] for e in train] == sorted(e["i"] for e in train)
    assert hold_out(examples, 0.25, seed=3, path=tmp_path / "x.jsonl") == (train, eval_)  # same seed, same split
    assert hold_out(examples, 0.25, seed=4, path=tmp_path / "x.jsonl")[1] != eval_
    assert len(hold_out(examples, 0.01, seed=3, path=tmp_path / "x.jsonl")[1]) == 1  # at least one
    with pytest.raises(DataError) as info:
        hold_out(examples[:1], 0.5, seed=0, path=tmp_path / "x.jsonl")
    assert str(info.value) == (
        f"{tmp_path / 'x.jsonl'}: 1 usable rows are too few to hold out eval_fraction 0.5 and keep some for training"
    )


def test_eval_path_and_eval_fraction_exclude_each_other(tmp_path: Path) -> None:
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    for path in (train, test):
        path.write_text(json.dumps(ROWS[0]) + "\n")
    assert FileDataConfig(path=train, eval_path=test).eval_fraction == 0.0
    assert FileDataConfig(path=train, eval_fraction=0.1).eval_path is None
    with pytest.raises(ValidationError, match="give 'eval_path' or 'eval_fraction', not both"):
        FileDataConfig(path=train, eval_path=test, eval_fraction=0.1)
    with pytest.raises(ValidationError, match="less than 1"):
        FileDataConfig(path=train, eval_fraction=1.0)
    with pytest.raises(ValidationError, match="file not found"):
        FileDataConfig(path=tmp_path / "nowhere.jsonl")


def test_keep_fitting_drops_skipped_rows_into_the_report(tmp_path: Path) -> None:
    skipped, report = DataReport(), DataReport()
    skipped.skip("too long", 2)
    report.skip("too long", 1)  # from another file: counts add up
    assert keep_fitting(tmp_path / "x.jsonl", [{"i": 0}, None, {"i": 2}, None], skipped, report) == [{"i": 0}, {"i": 2}]
    assert report.skipped == {"too long": 3}
    with pytest.raises(DataError) as info:
        keep_fitting(tmp_path / "x.jsonl", [None, None], skipped, DataReport())
    assert str(info.value) == f"{tmp_path / 'x.jsonl'}: every row was skipped (2 too long)"
