"""Unknown tokens per data file: counted into the report, warned about above 1%, refused above
``data.max_unk_fraction``.

The quickstart tokenizer (``recipes/assets/arith/tokenizer``) knows one token per character
of ``0123456789+=``, ``\\n``, ``:`` and ``a``-``z``; anything else (capitals, a space) is
``<unk>``, so the expected counts are worked out by hand from the text.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from aligntk import DataContext, DataError, DataSplits
from aligntk_po.data import PreferenceData
from aligntk_sft.data import SFTData

ARITH = Path(__file__).resolve().parents[1] / "recipes" / "assets" / "arith"

# 1+1=2</s>: 6 tokens, none unknown; 1+X=2</s>: 6, one; A+B=C</s>: 6, three.
DIRTY = [
    {"prompt": "1+1=", "completion": "2"},
    {"prompt": "1+X=", "completion": "2"},
    {"prompt": "A+B=", "completion": "C"},
]
CLEAN = [{"prompt": "12+30=", "completion": "42"}]  # 9 tokens with </s>


def arith_tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(ARITH / "tokenizer")


@pytest.fixture(scope="module")
def tok() -> Any:
    return arith_tokenizer()


def write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def load_sft(path: Path, tok: Any, **options: Any) -> DataSplits:
    return SFTData(SFTData.Config(path=path, **options)).load(DataContext(tokenizer=tok, seed=0))


def load_preference(path: Path, tok: Any, **options: Any) -> DataSplits:
    return PreferenceData(PreferenceData.Config(path=path, **options)).load(DataContext(tokenizer=tok, seed=0))


def unk_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "aligntk" and "unknown token" in r.getMessage()]


# --------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------


def test_the_tokenizer_maps_unknown_characters_to_unk(tok) -> None:
    assert tok.unk_token == "<unk>"
    unk, plus, b = tok.unk_token_id, tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("b")
    assert tok("A+ b", add_special_tokens=False)["input_ids"] == [unk, plus, unk, b]


def test_sft_counts_unknown_tokens_of_a_file(tmp_path, tok) -> None:
    path = write(tmp_path / "train.jsonl", DIRTY)
    splits = load_sft(path, tok)
    assert splits.report.unknown_tokens == {str(path): {"unknown": 4, "tokens": 18}}
    unk = tok.unk_token_id
    assert sum(ex["input_ids"].count(unk) for ex in splits.train) == 4


def test_sft_chat_counts_the_template_characters_too(tmp_path, tok) -> None:
    # "user: Hi\nassistant: 2</s>\n": 23 tokens; the two spaces of the template and the "H" are unknown.
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "2"}]}]
    path = write(tmp_path / "chat.jsonl", rows)
    splits = load_sft(path, tok)
    assert splits.report.unknown_tokens == {str(path): {"unknown": 3, "tokens": 23}}


def test_preference_counts_chosen_and_rejected(tmp_path, tok) -> None:
    rows = [
        {"prompt": "1+X=", "chosen": "2", "rejected": "3"},  # 1+X=2</s>, 1+X=3</s>: 12 tokens, 2 unknown
        {"prompt": "1+1=", "chosen": "Y", "rejected": "33"},  # 1+1=Y</s>, 1+1=33</s>: 13 tokens, 1 unknown
    ]
    path = write(tmp_path / "pairs.jsonl", rows)
    splits = load_preference(path, tok)
    assert splits.report.unknown_tokens == {str(path): {"unknown": 3, "tokens": 25}}


def test_a_file_without_unknown_characters_reports_zero(caplog, tok) -> None:
    path = ARITH / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    expected = sum(len(r["prompt"]) + len(r["completion"]) + 1 for r in rows)  # one token per character, and </s>
    with caplog.at_level(logging.WARNING, logger="aligntk"):
        splits = load_sft(path, tok)
    assert splits.report.unknown_tokens == {str(path): {"unknown": 0, "tokens": expected}}
    assert unk_warnings(caplog) == []


def test_train_and_eval_files_are_counted_separately(tmp_path, tok) -> None:
    train = write(tmp_path / "train.jsonl", CLEAN)
    eval_ = write(tmp_path / "eval.jsonl", DIRTY)
    splits = load_sft(train, tok, eval_path=eval_)
    assert splits.report.unknown_tokens == {
        str(train): {"unknown": 0, "tokens": 9},
        str(eval_): {"unknown": 4, "tokens": 18},
    }


def test_a_held_out_share_is_counted_with_its_file(tmp_path, tok) -> None:
    path = write(tmp_path / "train.jsonl", DIRTY)
    splits = load_sft(path, tok, eval_fraction=0.3)
    assert (len(splits.train), len(splits.eval)) == (2, 1)
    assert splits.report.unknown_tokens == {str(path): {"unknown": 4, "tokens": 18}}


def test_tokens_are_counted_after_truncation(tmp_path, tok) -> None:
    path = write(tmp_path / "train.jsonl", [{"prompt": "1+1=", "completion": "XYZ"}])
    splits = load_sft(path, tok, max_length=5)  # 1+1=X: the Y, Z and </s> are cut
    assert splits.report.unknown_tokens == {str(path): {"unknown": 1, "tokens": 5}}


def test_a_tokenizer_without_an_unknown_token_counts_nothing(tmp_path, caplog) -> None:
    tok = arith_tokenizer()
    tok.unk_token = None  # as a byte-level BPE tokenizer: every character encodes
    assert tok.unk_token_id is None
    path = write(tmp_path / "train.jsonl", DIRTY)
    with caplog.at_level(logging.WARNING, logger="aligntk"):
        splits = load_sft(path, tok, max_unk_fraction=0.0)
    assert splits.report.unknown_tokens == {}
    assert unk_warnings(caplog) == []


# --------------------------------------------------------------------------------------
# Warning and refusing
# --------------------------------------------------------------------------------------


def test_above_one_percent_warns_once_per_file(tmp_path, caplog, tok) -> None:
    path = write(tmp_path / "train.jsonl", DIRTY)
    with caplog.at_level(logging.WARNING, logger="aligntk"):
        load_sft(path, tok)
    assert unk_warnings(caplog) == [
        f"data: {path}: 22.2% of tokens are the unknown token '<unk>' (4 of 18); "
        "the tokenizer cannot encode some characters"
    ]


def test_at_most_one_percent_is_counted_without_a_warning(tmp_path, caplog, tok) -> None:
    # 1+11...1X= (101 characters) then 2</s>: 1 unknown of 103 tokens, 0.97%.
    path = write(tmp_path / "train.jsonl", [{"prompt": "1+" + "1" * 97 + "X=", "completion": "2"}])
    with caplog.at_level(logging.WARNING, logger="aligntk"):
        splits = load_sft(path, tok)
    assert splits.report.unknown_tokens == {str(path): {"unknown": 1, "tokens": 103}}
    assert unk_warnings(caplog) == []


def test_max_unk_fraction_refuses_a_file_above_it(tmp_path, tok) -> None:
    path = write(tmp_path / "train.jsonl", DIRTY)
    with pytest.raises(DataError) as info:
        load_sft(path, tok, max_unk_fraction=0.05)
    assert str(info.value) == (
        f"{path}: 22.2% of tokens are unknown ('<unk>'), above data.max_unk_fraction 0.05; "
        "the tokenizer cannot encode this data (use a tokenizer that covers its characters)"
    )


def test_max_unk_fraction_names_the_eval_file_when_it_is_the_one(tmp_path, tok) -> None:
    train = write(tmp_path / "train.jsonl", CLEAN)
    eval_ = write(tmp_path / "eval.jsonl", DIRTY)
    with pytest.raises(DataError) as info:
        load_sft(train, tok, eval_path=eval_, max_unk_fraction=0.05)
    assert str(info.value).startswith(f"{eval_}: 22.2% of tokens are unknown ('<unk>'), ")


def test_max_unk_fraction_refuses_preference_data(tmp_path, tok) -> None:
    path = write(tmp_path / "pairs.jsonl", [{"prompt": "1+X=", "chosen": "2", "rejected": "3"}])  # 2 of 12
    with pytest.raises(DataError) as info:
        load_preference(path, tok, max_unk_fraction=0.1)
    assert str(info.value).startswith(
        f"{path}: 16.7% of tokens are unknown ('<unk>'), above data.max_unk_fraction 0.1; "
    )


def test_a_share_at_or_under_max_unk_fraction_loads(tmp_path, tok) -> None:
    path = write(tmp_path / "train.jsonl", DIRTY)
    assert len(load_sft(path, tok, max_unk_fraction=4 / 18).train) == 3
    assert len(load_sft(write(tmp_path / "clean.jsonl", CLEAN), tok, max_unk_fraction=0.0).train) == 1


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_max_unk_fraction_is_a_share(tmp_path, value) -> None:
    with pytest.raises(ValidationError, match="max_unk_fraction"):
        SFTData.Config(path=write(tmp_path / "train.jsonl", CLEAN), max_unk_fraction=value)


def test_rollout_and_classification_data_count_their_files_too(tmp_path, tok) -> None:
    # Every file-based data component goes through load_splits, online prompts included.
    from aligntk_rl.data import RolloutData
    from aligntk_w2s.data import ClassificationData

    def expected(texts: list[str]) -> dict[str, int]:
        ids = [i for t in texts for i in tok(t)["input_ids"]]
        return {"unknown": ids.count(tok.unk_token_id), "tokens": len(ids)}

    prompts = write(tmp_path / "prompts.jsonl", [{"prompt": "1+A=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"}])
    splits = RolloutData(RolloutData.Config(path=prompts)).load(DataContext(tokenizer=tok, seed=0, rewards=[(1.0, object())]))
    assert splits.report.unknown_tokens == {str(prompts): expected(["1+A=", "2+2="])}
    assert expected(["1+A="])["unknown"] == 1

    texts = write(tmp_path / "texts.jsonl", [{"text": "1+Z", "label": 0}, {"text": "2+2", "label": 1}])
    counts = expected(["1+Z", "2+2"])
    splits = ClassificationData(ClassificationData.Config(path=texts)).load(DataContext(tokenizer=tok, seed=0))
    assert splits.report.unknown_tokens == {str(texts): counts} and counts["unknown"] == 1
    with pytest.raises(DataError, match=r"texts.jsonl: .* above data.max_unk_fraction 0.1"):
        ClassificationData(ClassificationData.Config(path=texts, max_unk_fraction=0.1)).load(
            DataContext(tokenizer=tok, seed=0)
        )
