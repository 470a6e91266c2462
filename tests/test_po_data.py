"""The ``preference`` data component: tokenizing, masks, padding, truncation and bad rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from aligntk import DataContext, DataError
from aligntk.testing import char_tokenizer
from aligntk_po.data import PreferenceData


def write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load(path: Path, **options: Any) -> tuple[PreferenceData, Any]:
    data = PreferenceData(PreferenceData.Config(path=path, **options))
    return data, data.load(DataContext(tokenizer=char_tokenizer(), seed=0))


def ids(text: str) -> list[int]:
    return char_tokenizer()(text, add_special_tokens=False)["input_ids"]


EOS = char_tokenizer().eos_token_id
PAD = char_tokenizer().pad_token_id


def test_text_rows_are_labelled_on_completions_only(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", [{"prompt": "1+2=", "chosen": "3", "rejected": "14"}])
    _, splits = load(path)
    (ex,) = splits.train
    assert ex["chosen_input_ids"] == ids("1+2=3") + [EOS]
    assert ex["chosen_labels"] == [-100] * 4 + ids("3") + [EOS]
    assert ex["rejected_input_ids"] == ids("1+2=14") + [EOS]
    assert ex["rejected_labels"] == [-100] * 4 + ids("14") + [EOS]
    assert ex["prompt_ids"] == ids("1+2=") and ex["reference"] == "3" and ex["margin"] == 0.0


def test_collate_pads_both_sides_to_one_width(tmp_path: Path) -> None:
    rows = [
        {"prompt": "1+2=", "chosen": "3", "rejected": "14", "margin": 2},
        {"prompt": "10+20=", "chosen": "30", "rejected": "3"},
    ]
    data, splits = load(write(tmp_path / "p.jsonl", rows))
    batch = data.collate(list(splits.train))
    assert set(batch) == PreferenceData.provides
    width = len(ids("10+20=30")) + 1
    for side in ("chosen", "rejected"):
        assert batch[f"{side}_input_ids"].shape == (2, width)
        assert batch[f"{side}_labels"].shape == (2, width)
    mask = batch["rejected_attention_mask"]
    assert mask[0].tolist() == [1] * 7 + [0] * (width - 7)
    assert batch["rejected_input_ids"][0, 7:].eq(PAD).all()
    assert batch["rejected_labels"][0, 7:].eq(-100).all()
    assert batch["margin"].tolist() == [2.0, 0.0] and batch["margin"].dtype == torch.float32
    # Chosen and rejected concatenate along the batch for one forward pass.
    assert torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]).shape == (4, width)


def test_chat_rows(tmp_path: Path) -> None:
    prompt = [{"role": "user", "content": "1+2"}]
    rows = [
        {"prompt": prompt, "chosen": "3", "rejected": [{"role": "assistant", "content": "4"}]},
    ]
    _, splits = load(write(tmp_path / "c.jsonl", rows))
    (ex,) = splits.train
    prompt_ids = ids("user: 1+2\nassistant: ")
    assert ex["prompt_ids"] == prompt_ids
    assert ex["chosen_input_ids"] == prompt_ids + ids("3") + [EOS] + ids("\n")
    assert ex["chosen_labels"] == [-100] * len(prompt_ids) + ids("3") + [EOS] + ids("\n")
    assert ex["rejected_input_ids"] == prompt_ids + ids("4") + [EOS] + ids("\n")
    assert ex["reference"] == "3"


USER = [{"role": "user", "content": "x"}]
BAD_ROWS = [
    ({"prompt": "1+2=", "chosen": "3"}, r"expected 'prompt', 'chosen' and 'rejected' \(missing 'rejected'"),
    ({"prompt": "1+2=", "chosen": 3, "rejected": "4"}, r"'chosen' must be a string when the prompt is, got int"),
    ({"prompt": 5, "chosen": "3", "rejected": "4"}, r"'prompt' must be a string or a list of messages, got int"),
    ({"prompt": "1+2=", "chosen": "3", "rejected": "4", "margin": "big"}, r"'margin' must be a number"),
    ({"prompt": USER, "chosen": USER, "rejected": "4"}, r"chosen\[0\] must be an assistant message, got role 'user'"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "3", "rejected": "4"},
     r"'prompt' must not end with an assistant message"),
    ({"prompt": [{"role": "user"}], "chosen": "3", "rejected": "4"},
     r"prompt\[0\]\.content must be a string, got null"),
    ("[1, 2]", r"expected a JSON object, got list"),
]  # fmt: skip


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_bad_rows_name_file_and_line(tmp_path: Path, row: Any, message: str) -> None:
    path = write(tmp_path / "p.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, row])
    with pytest.raises(DataError, match=r"p\.jsonl:2: " + message):
        load(path)


def test_truncation_policies(tmp_path: Path) -> None:
    rows = [{"prompt": "11+22=", "chosen": "33", "rejected": "3"}, {"prompt": "1+1=", "chosen": "2", "rejected": "3"}]
    path = write(tmp_path / "p.jsonl", rows)
    limit = 7  # "11+22=33</s>" is 9 tokens, "11+22=3</s>" 8

    _, right = load(path, max_length=limit, truncation="right")
    ex = right.train[0]
    assert ex["chosen_input_ids"] == ids("11+22=3") and ex["rejected_input_ids"] == ids("11+22=3")
    assert ex["chosen_labels"][-1] == ids("3")[0]

    _, left = load(path, max_length=limit, truncation="left")
    ex = left.train[0]
    # The same two prompt tokens are cut from both sides; the longer completion still fits.
    assert ex["chosen_input_ids"] == ids("+22=33") + [EOS]
    assert ex["rejected_input_ids"] == ids("+22=3") + [EOS]
    assert ex["prompt_ids"] == ids("11+22=")  # evaluators see the whole prompt

    _, dropped = load(path, max_length=limit, truncation="drop")
    assert len(dropped.train) == 1 and dropped.report.skipped == {"longer than max_length": 1}

    with pytest.raises(DataError, match=r"p\.jsonl:1: 9 tokens, longer than max_length 7"):
        load(path, max_length=limit, truncation="error")


def test_pairs_without_completion_tokens_are_skipped(tmp_path: Path) -> None:
    rows = [{"prompt": "11+22=", "chosen": "33", "rejected": "3"}, {"prompt": "1=", "chosen": "1", "rejected": "2"}]
    _, splits = load(write(tmp_path / "p.jsonl", rows), max_length=6)
    assert len(splits.train) == 1 and splits.report.skipped == {"no completion tokens after truncation": 1}


def test_eval_split_and_empty_file(tmp_path: Path) -> None:
    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i)} for i in range(10)]
    _, splits = load(write(tmp_path / "p.jsonl", rows), eval_fraction=0.2)
    assert (len(splits.train), len(splits.eval)) == (8, 2)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="has no rows"):
        load(tmp_path / "empty.jsonl")


def test_split_along_batch_keeps_pairs_together(tmp_path: Path) -> None:
    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i)} for i in range(4)]
    data, splits = load(write(tmp_path / "p.jsonl", rows))
    batch = data.collate(list(splits.train))
    half = {k: v[:2] for k, v in batch.items()}
    alone = data.collate(list(splits.train)[:2])
    width = alone["chosen_input_ids"].shape[1]
    for key, value in alone.items():
        if value.dim() == 2:
            assert half[key][:, :width].equal(value)
        else:
            assert half[key].equal(value)
