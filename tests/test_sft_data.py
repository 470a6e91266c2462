"""The SFT data component and the data-file reader, checked with a character tokenizer.

``char_tokenizer`` maps every character to one token, so expected ids and label positions
are worked out by hand from the text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from aligntk import DataComponent, DataContext, DataError, DataSplits
from aligntk.datafiles import read_rows
from aligntk.testing import char_tokenizer
from aligntk_sft.data import IGNORE_INDEX, SFTData
from helpers import char_ids as ids
from helpers import write_jsonl

M = IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()




def load(path: Path, tok, seed: int = 0, **options: Any) -> DataSplits:
    data = SFTData(SFTData.Config(path=path, **options))
    return data.load(DataContext(tokenizer=tok, seed=seed))


def load_rows(tmp_path: Path, tok, rows: list[Any], **options: Any) -> DataSplits:
    return load(write_jsonl(tmp_path / "train.jsonl", rows), tok, **options)


PAIRS = [
    {"prompt": "1+1=", "completion": "2"},
    {"prompt": "12+30=", "completion": "42"},
    {"prompt": "what is 3*3?", "completion": "9"},
]


# --------------------------------------------------------------------------------------
# Prompt/completion rows
# --------------------------------------------------------------------------------------


def test_prompt_tokens_are_masked_and_eos_appended(tmp_path, tok):
    splits = load_rows(tmp_path, tok, [{"prompt": "1+1=", "completion": "2"}])
    (ex,) = splits.train
    eos = tok.eos_token_id
    assert ex["input_ids"] == ids(tok, "1+1=2") + [eos]
    assert ex["labels"] == [M, M, M, M] + ids(tok, "2") + [eos]
    assert ex["prompt_ids"] == ids(tok, "1+1=")
    assert ex["reference"] == "2"
    assert splits.report.rows == {"train": 1, "eval": 0}
    assert splits.report.skipped == {}


def test_include_prompt_labels_every_token(tmp_path, tok):
    (ex,) = load_rows(tmp_path, tok, [{"prompt": "ab", "completion": "c"}], include_prompt=True).train
    assert ex["labels"] == ex["input_ids"] == ids(tok, "abc") + [tok.eos_token_id]


def test_add_eos_false_appends_nothing(tmp_path, tok):
    (ex,) = load_rows(tmp_path, tok, [{"prompt": "ab", "completion": "c"}], add_eos=False).train
    assert ex["input_ids"] == ids(tok, "abc")
    assert ex["labels"] == [M, M] + ids(tok, "c")


def test_custom_keys(tmp_path, tok):
    rows = [{"question": "ab", "answer": "c"}]
    (ex,) = load_rows(tmp_path, tok, rows, prompt_key="question", completion_key="answer", add_eos=False).train
    assert ex["input_ids"] == ids(tok, "abc")


# --------------------------------------------------------------------------------------
# Chat rows
# --------------------------------------------------------------------------------------

CHAT = {
    "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "no"},
        {"role": "assistant", "content": "yes"},
    ]
}


def test_chat_labels_assistant_turns_only(tmp_path, tok):
    (ex,) = load_rows(tmp_path, tok, [CHAT]).train
    eos = tok.eos_token_id
    # Rendered: "user: hi\nassistant: " (20 chars) "ok</s>\n" "user: no\nassistant: " (20) "yes</s>\n"
    first_prompt = ids(tok, "user: hi\nassistant: ")
    second_prompt = ids(tok, "\nuser: no\nassistant: ")[1:]
    expected = first_prompt + ids(tok, "ok") + [eos] + ids(tok, "\n") + second_prompt + ids(tok, "yes") + [eos]
    expected += ids(tok, "\n")
    assert ex["input_ids"] == expected
    labelled = [i for i, label in enumerate(ex["labels"]) if label != M]
    assert labelled == [20, 21, 22, 23, 44, 45, 46, 47, 48]
    assert [ex["labels"][i] for i in labelled] == [ex["input_ids"][i] for i in labelled]
    # The prompt to generate from: everything before the last reply, with the generation prompt.
    assert ex["prompt_ids"] == ex["input_ids"][:44]
    assert ex["reference"] == "yes"


def test_chat_include_prompt_labels_everything(tmp_path, tok):
    (ex,) = load_rows(tmp_path, tok, [CHAT], include_prompt=True).train
    assert ex["labels"] == ex["input_ids"]


def test_chat_left_truncation_keeps_last_reply(tmp_path, tok):
    (ex,) = load_rows(tmp_path, tok, [CHAT], max_length=10, truncation="left").train
    # 49 tokens; the last reply starts at 44, so 39 are cut from the start and "...ant: yes</s>\n" stays.
    assert ex["input_ids"] == ids(tok, "ant: yes") + [tok.eos_token_id] + ids(tok, "\n")
    assert ex["labels"] == [M] * 5 + ex["input_ids"][5:]


def test_chat_without_template_is_an_error(tmp_path):
    plain = char_tokenizer()
    plain.chat_template = None
    with pytest.raises(DataError, match=r"train\.jsonl:1: the row has messages but the tokenizer has no chat template"):
        load_rows(tmp_path, plain, [CHAT])


def test_chat_template_that_is_not_incremental_is_an_error(tmp_path):
    odd = char_tokenizer()
    odd.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages|length }}"
    with pytest.raises(DataError, match=r"train\.jsonl:1: the tokenizer's chat template is not incremental"):
        load_rows(tmp_path, odd, [CHAT])


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hi", r"'messages' must be a list of messages, got string"),
        ([], r"'messages' is an empty list"),
        (["hi"], r"messages\[0\] must be an object with 'role' and 'content', got string"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\.content must be a string, got int"),
        ([{"content": "hi"}], r"messages\[0\]\.role must be a string, got null"),
        ([{"role": "user", "content": "hi"}], r"the last message must be the assistant's .* got role 'user'"),
        ([{"role": "assistant", "content": "hi"}], r"the conversation starts with the assistant"),
    ],
)
def test_bad_messages(tmp_path, tok, messages, message):
    with pytest.raises(DataError, match=r"train\.jsonl:1: " + message):
        load_rows(tmp_path, tok, [{"messages": messages}])


# --------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------

LONG = {"prompt": "abcdef", "completion": "xyz"}  # 6 + 3 + eos = 10 tokens


def test_truncation_right_cuts_the_end(tmp_path, tok):
    (ex,) = load_rows(tmp_path, tok, [LONG], max_length=8, truncation="right").train
    assert ex["input_ids"] == ids(tok, "abcdefxy")
    assert ex["labels"] == [M] * 6 + ids(tok, "xy")
    assert ex["prompt_ids"] == ids(tok, "abcdef")  # evaluators still see the whole prompt


def test_truncation_left_cuts_the_prompt_start(tmp_path, tok):
    (ex,) = load_rows(tmp_path, tok, [LONG], max_length=8, truncation="left").train
    assert ex["input_ids"] == ids(tok, "cdefxyz") + [tok.eos_token_id]
    assert ex["labels"] == [M] * 4 + ids(tok, "xyz") + [tok.eos_token_id]


def test_truncation_left_cuts_a_too_long_completion_at_its_end(tmp_path, tok):
    row = {"prompt": "ab", "completion": "uvwxyz"}  # 2 + 6 + eos = 9 tokens
    (ex,) = load_rows(tmp_path, tok, [row], max_length=5, truncation="left").train
    assert ex["input_ids"] == ex["labels"] == ids(tok, "uvwxy")


def test_truncation_drop_skips_and_counts(tmp_path, tok):
    splits = load_rows(tmp_path, tok, [LONG, PAIRS[0]], max_length=8, truncation="drop")
    assert [ex["reference"] for ex in splits.train] == ["2"]
    assert len(splits.train[0]["input_ids"]) == 6
    assert splits.report.skipped == {"longer than max_length": 1}
    assert splits.report.rows == {"train": 1, "eval": 0}


def test_truncation_error_names_the_line(tmp_path, tok):
    with pytest.raises(DataError, match=r"train\.jsonl:2: 10 tokens, longer than max_length 8"):
        load_rows(tmp_path, tok, [PAIRS[0], LONG], max_length=8, truncation="error")


def test_rows_with_nothing_left_to_learn_are_skipped(tmp_path, tok):
    splits = load_rows(tmp_path, tok, [LONG, PAIRS[0]], max_length=6, truncation="right")
    assert [ex["reference"] for ex in splits.train] == ["2"]
    assert splits.report.skipped == {"no completion tokens after truncation": 1}


def test_every_row_skipped_is_an_error(tmp_path, tok):
    with pytest.raises(DataError, match=r"train\.jsonl: every row was skipped \(1 longer than max_length\)"):
        load_rows(tmp_path, tok, [LONG], max_length=8, truncation="drop")


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_malformed_json_names_the_line(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl:2: not valid JSON: "):
        load(path, tok)


def test_missing_key_lists_the_keys(tmp_path, tok):
    rows = [PAIRS[0], {"prompt": "a", "answer": "b"}]
    expected = (
        r"train\.jsonl:2: expected 'prompt' and 'completion' strings or a 'messages' list "
        r"\(got keys \['answer', 'prompt'\]\)"
    )
    with pytest.raises(DataError, match=expected):
        load_rows(tmp_path, tok, rows)


def test_wrong_type_is_named(tmp_path, tok):
    with pytest.raises(DataError, match=r"train\.jsonl:1: 'completion' must be a string, got int"):
        load_rows(tmp_path, tok, [{"prompt": "1+1=", "completion": 2}])


def test_row_that_is_not_an_object(tmp_path, tok):
    with pytest.raises(DataError, match=r"train\.jsonl:2: expected a JSON object, got list"):
        load_rows(tmp_path, tok, [PAIRS[0], ["1+1=", "2"]])


def test_missing_file(tmp_path, tok):
    # The recipe's options refuse a missing file before anything loads ...
    with pytest.raises(ValueError, match=r"file not found: .*nope\.jsonl"):
        load(tmp_path / "nope.jsonl", tok)
    # ... and the reader says the same if it disappears in between.
    from aligntk.datafiles import read_rows

    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found"):
        list(read_rows(tmp_path / "nope.jsonl"))


def test_unknown_extension(tmp_path, tok):
    path = tmp_path / "train.txt"
    path.write_text("1+1=2\n")
    expected = r"train\.txt: unknown data file type '\.txt'; supported: \.jsonl, \.json, \.csv, \.parquet"
    with pytest.raises(DataError, match=expected):
        load(path, tok)


def test_empty_file(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=r"train\.jsonl: the file has no rows"):
        load(path, tok)


def test_tokenizer_without_pad_token(tmp_path):
    with pytest.raises(DataError, match=r"the tokenizer has no pad token; .*model\.pad_token: '</s>'"):
        load_rows(tmp_path, char_tokenizer(pad=False), PAIRS)


def test_json_file_that_is_not_a_list(tmp_path, tok):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(PAIRS[0]))
    with pytest.raises(DataError, match=r"train\.json: a \.json data file holds a list of objects, got object"):
        load(path, tok)


@pytest.mark.parametrize(
    "options",
    [
        {"eval_fraction": 1.0},
        {"eval_fraction": -0.1},
        {"max_length": 0},
        {"truncation": "middle"},
        {"eval_fraction": 0.1, "eval_path": "eval.jsonl"},
        {"shuffle": True},
    ],
)
def test_bad_options(options):
    with pytest.raises(ValidationError):
        SFTData.Config(path="train.jsonl", **options)


# --------------------------------------------------------------------------------------
# File formats
# --------------------------------------------------------------------------------------

NUMERIC = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "a b", "completion": ""}, *PAIRS]


def test_csv_parquet_and_json_load_the_same_examples_as_jsonl(tmp_path, tok):
    expected = load(write_jsonl(tmp_path / "train.jsonl", NUMERIC), tok).train
    frame = pd.DataFrame(NUMERIC)
    frame.to_csv(tmp_path / "train.csv", index=False)
    frame.to_parquet(tmp_path / "train.parquet")
    (tmp_path / "train.json").write_text(json.dumps(NUMERIC))
    for name in ("train.csv", "train.parquet", "train.json"):
        assert load(tmp_path / name, tok).train == expected, name
    # CSV cells stay text: the completion "4" is not read as a number.
    assert expected[0]["reference"] == "4"


def test_parquet_chat_rows(tmp_path, tok):
    pd.DataFrame([CHAT]).to_parquet(tmp_path / "train.parquet")
    assert load(tmp_path / "train.parquet", tok).train == load_rows(tmp_path, tok, [CHAT]).train


def test_read_rows_locations(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    (tmp_path / "t.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "t.csv").write_text('prompt,completion\na,b\n\n"c",d\n')
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    csv_path, json_path, parquet_path = tmp_path / "t.csv", tmp_path / "t.json", tmp_path / "t.parquet"
    assert list(read_rows(jsonl)) == [(f"{jsonl}:1", rows[0]), (f"{jsonl}:3", rows[1])]
    assert list(read_rows(json_path)) == [(f"{json_path}: row 1", rows[0]), (f"{json_path}: row 2", rows[1])]
    assert list(read_rows(csv_path)) == [(f"{csv_path}:2", rows[0]), (f"{csv_path}:4", rows[1])]
    assert list(read_rows(parquet_path)) == [(f"{parquet_path}: row 1", rows[0]), (f"{parquet_path}: row 2", rows[1])]


def test_csv_row_spanning_lines_is_located_by_its_first_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('prompt,completion\n"a\nb",c\nd,e,f\n')
    with pytest.raises(DataError, match=r"t\.csv:4: 3 cells, but the header has 2 columns"):
        list(read_rows(path))


def test_json_array_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": }\n]\n')
    with pytest.raises(DataError, match=r"t\.json:3: not valid JSON"):
        list(read_rows(path))


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"t\.parquet: not a readable Parquet file"):
        list(read_rows(path))


# --------------------------------------------------------------------------------------
# Evaluation split
# --------------------------------------------------------------------------------------

MANY = [{"prompt": f"{i}+0=", "completion": str(i)} for i in range(10)]


def test_eval_fraction_is_deterministic_and_disjoint(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", MANY)
    first = load(path, tok, seed=0, eval_fraction=0.3)
    again = load(path, tok, seed=0, eval_fraction=0.3)
    other = load(path, tok, seed=1, eval_fraction=0.3)
    train = [ex["reference"] for ex in first.train]
    held = [ex["reference"] for ex in first.eval]
    assert len(held) == 3 and len(train) == 7
    assert set(train).isdisjoint(held)
    assert sorted(train + held, key=int) == [str(i) for i in range(10)]
    assert train == sorted(train, key=int)  # file order is kept within each split
    assert [ex["reference"] for ex in again.eval] == held
    assert [ex["reference"] for ex in other.eval] != held
    assert first.report.rows == {"train": 7, "eval": 3}


def test_eval_fraction_needs_enough_rows(tmp_path, tok):
    with pytest.raises(DataError, match=r"1 usable rows are too few to hold out eval_fraction 0\.5"):
        load_rows(tmp_path, tok, [PAIRS[0]], eval_fraction=0.5)


def test_eval_path(tmp_path, tok):
    eval_path = write_jsonl(tmp_path / "eval.jsonl", PAIRS[:2])
    splits = load_rows(tmp_path, tok, MANY, eval_path=eval_path)
    assert [ex["reference"] for ex in splits.eval] == ["2", "42"]
    assert splits.report.rows == {"train": 10, "eval": 2}


# --------------------------------------------------------------------------------------
# Collate
# --------------------------------------------------------------------------------------


def test_collate_right_pads(tmp_path, tok):
    data = SFTData(SFTData.Config(path=write_jsonl(tmp_path / "train.jsonl", PAIRS[:2])))
    splits = data.load(DataContext(tokenizer=tok, seed=0))
    batch = data.collate(splits.train)  # lengths 6 ("1+1=2" + eos) and 9 ("12+30=42" + eos)
    assert set(batch) == SFTData.provides
    assert all(t.shape == (2, 9) and t.dtype == torch.long for t in batch.values())
    pad, eos = tok.pad_token_id, tok.eos_token_id
    assert batch["input_ids"][0].tolist() == ids(tok, "1+1=2") + [eos, pad, pad, pad]
    assert batch["attention_mask"].tolist() == [[1] * 6 + [0] * 3, [1] * 9]
    assert batch["labels"][0].tolist() == [M] * 4 + ids(tok, "2") + [eos, M, M, M]
    assert batch["labels"][1].tolist() == [M] * 6 + ids(tok, "42") + [eos]


def test_collate_before_load_is_an_error(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(RuntimeError, match="load"):
        SFTData(SFTData.Config(path=tmp_path / "train.jsonl")).collate([{"input_ids": [1], "labels": [1]}])


def test_is_a_data_component(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    assert isinstance(SFTData(SFTData.Config(path=tmp_path / "train.jsonl")), DataComponent)
