"""TRL's dataset formats, and Hugging Face ``datasets`` folders, read as they are by ``sft`` and ``preference``.

Each format is checked against the plain format it means (ShareGPT against ``messages``,
an implicit prompt against the explicit one ...) with the character tokenizer, so equal
examples mean equal tokens and labels; each trains for two steps; and one bad row in each
is one line naming that row.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import datasets
import pytest

from aligntk import DataContext, DataError, DataSplits, normalize_messages
from aligntk.testing import TINY_LLAMA, char_tokenizer, read_metrics, run_recipe
from aligntk_po.data import PreferenceData
from aligntk_sft.data import IGNORE_INDEX, SFTData
from helpers import char_ids as ids
from helpers import write_jsonl

M = IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()




def sft(tmp_path: Path, tok, rows: list[Any], name: str = "train.jsonl", **options: Any) -> DataSplits:
    data = SFTData(SFTData.Config(path=write_jsonl(tmp_path / name, rows), **options))
    return data.load(DataContext(tokenizer=tok, seed=0))


def prefs(tmp_path: Path, tok, rows: list[Any], name: str = "train.jsonl", **options: Any) -> DataSplits:
    data = PreferenceData(PreferenceData.Config(path=write_jsonl(tmp_path / name, rows), **options))
    return data.load(DataContext(tokenizer=tok, seed=0))


def tokens(splits: DataSplits, fields: tuple[str, ...] = ("input_ids", "labels")) -> list[dict[str, Any]]:
    return [{f: e[f] for f in fields} for e in splits.train]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def one_line_error(match: str, load: Any) -> str:
    with pytest.raises(DataError, match=match) as info:
        load()
    assert "\n" not in str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------------------
# sft: language modelling text, prompt/completion messages, ShareGPT, content parts
# --------------------------------------------------------------------------------------


def test_text_rows_learn_every_token(tmp_path, tok):
    splits = sft(tmp_path, tok, [{"text": "1+1=2"}, {"text": "a cat."}])
    eos = tok.eos_token_id
    assert tokens(splits) == [
        {"input_ids": [*ids(tok, "1+1=2"), eos], "labels": [*ids(tok, "1+1=2"), eos]},
        {"input_ids": [*ids(tok, "a cat."), eos], "labels": [*ids(tok, "a cat."), eos]},
    ]
    assert splits.train[0]["prompt_ids"] == [] and splits.train[0]["reference"] == "1+1=2"
    no_eos = sft(tmp_path, tok, [{"text": "12"}], add_eos=False)
    assert tokens(no_eos) == [{"input_ids": ids(tok, "12"), "labels": ids(tok, "12")}]


def test_prompt_completion_messages_equal_the_conversation(tmp_path, tok):
    pc = sft(tmp_path, tok, [{"prompt": [user("1+1=")], "completion": [assistant("2")]}], "pc.jsonl")
    chat = sft(tmp_path, tok, [{"messages": [user("1+1="), assistant("2")]}], "chat.jsonl")
    assert tokens(pc) == tokens(chat)
    text = "user: 1+1=\nassistant: 2</s>\n"
    assert chat.train[0]["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    # A string completion is the assistant's reply.
    assert tokens(sft(tmp_path, tok, [{"prompt": [user("1+1=")], "completion": "2"}], "s.jsonl")) == tokens(chat)


def test_prompt_completion_messages_learn_the_completion_only(tmp_path, tok):
    turns = [user("1+1="), assistant("2"), user("2+2=")]
    pc = sft(tmp_path, tok, [{"prompt": turns, "completion": [assistant("4")]}], "pc.jsonl")
    chat = sft(tmp_path, tok, [{"messages": [*turns, assistant("4")]}], "chat.jsonl")
    assert pc.train[0]["input_ids"] == chat.train[0]["input_ids"]
    # The conversation learns both replies; prompt/completion only the last: "4</s>".
    targets = [t for t in pc.train[0]["labels"] if t != M]
    assert targets == [*ids(tok, "4"), tok.eos_token_id, *ids(tok, "\n")]
    assert [t for t in chat.train[0]["labels"] if t != M] == [
        *ids(tok, "2"), tok.eos_token_id, *ids(tok, "\n"), *targets
    ]
    assert pc.train[0]["reference"] == "4"


def test_sharegpt_equals_messages(tmp_path, tok):
    conversations = [
        {"from": "system", "value": "add."},
        {"from": "human", "value": "1+2="},
        {"from": "gpt", "value": "3"},
    ]
    messages = [{"role": "system", "content": "add."}, user("1+2="), assistant("3")]
    share = sft(tmp_path, tok, [{"conversations": conversations}], "share.jsonl")
    plain = sft(tmp_path, tok, [{"messages": messages}], "plain.jsonl")
    assert tokens(share, ("input_ids", "labels", "prompt_ids", "reference")) == tokens(
        plain, ("input_ids", "labels", "prompt_ids", "reference")
    )


def test_text_parts_equal_string_content(tmp_path, tok):
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "1+"}, {"type": "text", "text": "2="}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
    ]
    assert tokens(sft(tmp_path, tok, [{"messages": parts}], "parts.jsonl")) == tokens(
        sft(tmp_path, tok, [{"messages": [user("1+2="), assistant("3")]}], "plain.jsonl")
    )


def test_normalize_messages_maps_sharegpt_and_parts() -> None:
    value = [{"from": "human", "value": [{"type": "text", "text": "hi"}], "name": None}, {"from": "gpt", "value": "yo"}]
    assert normalize_messages(value, "f:1", "conversations") == [user("hi"), assistant("yo")]
    assert normalize_messages("not a list", "f:1", "m") == "not a list"  # check_messages reports it


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": 5}, r"^{path}:2: 'text' must be a string, got int$"),
        (
            {"prompt": [user("1+1=")], "completion": [user("2")]},
            r"^{path}:2: completion\[0\] must be an assistant message, got role 'user'$",
        ),
        (
            {"prompt": [user("1+1="), assistant("2")], "completion": "3"},
            r"^{path}:2: 'prompt' must not end with an assistant message",
        ),
        (
            {"conversations": [{"from": "human", "value": "1+1="}, {"from": "bot", "value": "2"}]},
            r"^{path}:2: conversations\[1\]\.from is 'bot'; ShareGPT speakers read are human, gpt and system$",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}, assistant("2")]},
            r"^{path}:2: messages\[0\]\.content\[0\] is a 'image' part; only text parts",
        ),
    ],
)
def test_sft_bad_row_is_one_line_naming_it(tmp_path, tok, row, message):
    path = tmp_path / "train.jsonl"
    rows = [{"text": "1+1=2"}, row]
    one_line_error(message.format(path=re.escape(str(path))), lambda: sft(tmp_path, tok, rows))


# --------------------------------------------------------------------------------------
# preference: implicit prompt, messages in other spellings, unpaired rows
# --------------------------------------------------------------------------------------

PAIR_FIELDS = ("prompt_ids", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "reference")


def test_implicit_prompt_messages_equal_the_explicit_prompt(tmp_path, tok):
    turns = [user("1+1="), assistant("2"), user("2+2=")]
    implicit = {"chosen": [*turns, assistant("4")], "rejected": [*turns, assistant("5")]}
    explicit = {"prompt": turns, "chosen": [assistant("4")], "rejected": [assistant("5")]}
    got = tokens(prefs(tmp_path, tok, [implicit], "i.jsonl"), PAIR_FIELDS)
    assert got == tokens(prefs(tmp_path, tok, [explicit], "e.jsonl"), PAIR_FIELDS)
    assert got[0]["prompt_ids"] == ids(tok, "user: 1+1=\nassistant: 2") + [tok.eos_token_id] + ids(
        tok, "\nuser: 2+2=\nassistant: "
    )


def test_implicit_prompt_strings_equal_the_explicit_prompt(tmp_path, tok):
    # As trl.extract_prompt: the shared text less its trailing space is the prompt.
    implicit = {"chosen": "1+2= 3", "rejected": "1+2= 4"}
    explicit = {"prompt": "1+2=", "chosen": " 3", "rejected": " 4"}
    assert tokens(prefs(tmp_path, tok, [implicit], "i.jsonl"), PAIR_FIELDS) == tokens(
        prefs(tmp_path, tok, [explicit], "e.jsonl"), PAIR_FIELDS
    )


def test_preference_reads_sharegpt_and_text_parts(tmp_path, tok):
    odd = {
        "prompt": [{"from": "human", "value": "1+2="}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "3"}]}],
        "rejected": [{"from": "gpt", "value": "4"}],
    }
    plain = {"prompt": [user("1+2=")], "chosen": [assistant("3")], "rejected": [assistant("4")]}
    assert tokens(prefs(tmp_path, tok, [odd], "o.jsonl"), PAIR_FIELDS) == tokens(
        prefs(tmp_path, tok, [plain], "p.jsonl"), PAIR_FIELDS
    )


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"prompt": "1+2=", "completion": "3", "label": True},
            r"^{path}:2: an unpaired preference row \(prompt, completion, label, as KTO reads\); .* unpaired data "
            r"needs a loss that takes it",
        ),
        (
            {"chosen": [user("1+2="), assistant("3")], "rejected": [user("2+2="), assistant("4")]},
            r"^{path}:2: without 'prompt', 'chosen' and 'rejected' must start with the same prompt",
        ),
        (
            {"chosen": [user("1+2="), assistant("3")], "rejected": "4"},
            r"^{path}:2: without 'prompt', 'chosen' and 'rejected' must both be lists of messages",
        ),
        (
            {"chosen": [user("1+2=")], "rejected": [user("1+2="), assistant("4")]},
            r"^{path}:2: without 'prompt', .* one of them is all prompt: it has no reply$",
        ),
    ],
)
def test_preference_bad_row_is_one_line_naming_it(tmp_path, tok, row, message):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}, row]
    one_line_error(message.format(path=re.escape(str(path))), lambda: prefs(tmp_path, tok, rows))


# --------------------------------------------------------------------------------------
# Hugging Face datasets folders (save_to_disk) and .arrow files
# --------------------------------------------------------------------------------------

ROWS = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "12+30=", "completion": "42"}]
TEST_ROWS = [{"prompt": "3+4=", "completion": "7"}]


def save_dict(folder: Path, train: list[dict[str, Any]], test: list[dict[str, Any]]) -> Path:
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    ).save_to_disk(str(folder))
    return folder


def sft_at(path: Path, tok, **options: Any) -> DataSplits:
    return SFTData(SFTData.Config(path=path, **options)).load(DataContext(tokenizer=tok, seed=0))


def test_dataset_dict_folder_reads_train_and_a_named_split(tmp_path, tok):
    folder = save_dict(tmp_path / "hf", ROWS, TEST_ROWS)
    expected = sft(tmp_path, tok, ROWS)
    expected_eval = tokens(sft(tmp_path, tok, TEST_ROWS, "test.jsonl"))
    by_path = sft_at(folder, tok, eval_path=Path(f"{folder}:test"))
    by_option = sft_at(folder, tok, eval_split="test")
    for splits in (by_path, by_option):
        assert tokens(splits) == tokens(expected)
        assert [{f: e[f] for f in ("input_ids", "labels")} for e in splits.eval] == expected_eval
    assert tokens(sft_at(folder, tok, split="test")) == expected_eval
    assert tokens(sft_at(Path(f"{folder}:test"), tok)) == expected_eval
    assert set(by_path.report.unknown_tokens) == {str(folder), f"{folder}:test"}  # each split counted


def test_dataset_folder_and_arrow_file(tmp_path, tok):
    folder = tmp_path / "hf"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    expected = tokens(sft(tmp_path, tok, ROWS))
    assert tokens(sft_at(folder, tok)) == expected
    (arrow,) = folder.glob("*.arrow")
    assert tokens(sft_at(arrow, tok)) == expected


def test_preference_reads_a_dataset_folder_with_implicit_prompts(tmp_path, tok):
    rows = [{"chosen": [user("1+2="), assistant("3")], "rejected": [user("1+2="), assistant("4")]}]
    folder = tmp_path / "hf"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    got = PreferenceData(PreferenceData.Config(path=folder)).load(DataContext(tokenizer=tok, seed=0))
    assert tokens(got, PAIR_FIELDS) == tokens(prefs(tmp_path, tok, rows), PAIR_FIELDS)


def test_dataset_folder_errors_name_the_split_and_row(tmp_path, tok):
    folder = save_dict(tmp_path / "hf", [ROWS[0], {"prompt": "1+1=", "completion": None}], TEST_ROWS)
    one_line_error(
        rf"^{folder}\[train\]: row 2: 'completion' must be a string, got null$", lambda: sft_at(folder, tok)
    )
    one_line_error(
        rf"^{folder}: no split 'validation' \(splits: train, test\)", lambda: sft_at(folder, tok, split="validation")
    )
    plain = tmp_path / "plain"
    plain.mkdir()
    one_line_error(rf"^{plain}: a folder, but not one written by datasets' save_to_disk", lambda: sft_at(plain, tok))
    one = tmp_path / "one"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(one))
    one_line_error(rf"^{one}: holds one Dataset, without splits", lambda: sft_at(one, tok, split="test"))
    with pytest.raises(ValueError, match="file not found"):
        SFTData.Config(path=tmp_path / "missing:train")


# --------------------------------------------------------------------------------------
# Two training steps in each format
# --------------------------------------------------------------------------------------


def recipe(folder: Path, data: dict[str, Any], loss: str = "sft") -> dict[str, Any]:
    char_tokenizer().save_pretrained(folder / "tokenizer")
    return {
        "output_dir": str(folder / "run"),
        "seed": 0,
        "model": {"config": dict(TINY_LLAMA), "tokenizer": str(folder / "tokenizer")},
        "data": data,
        "loss": {"name": loss},
        "update": {"name": "full", "learning_rate": 1e-3, "warmup_steps": 0},
        "train": {"max_steps": 2, "batch_size": 4},
    }


def sums(n: int = 8) -> list[tuple[str, str]]:
    return [(f"{a}+{a + 1}=", str(2 * a + 1)) for a in range(n)]


def train_two_steps(run: dict[str, Any]) -> list[dict[str, Any]]:
    steps = read_metrics(Path(run_recipe(run).run_dir))
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in steps)
    return steps


def test_train_on_text_rows(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": p + c} for p, c in sums()])
    train_two_steps(recipe(tmp_path, {"name": "sft", "path": str(path)}))


def test_train_on_prompt_completion_messages(tmp_path):
    rows = [{"prompt": [user(p)], "completion": [assistant(c)]} for p, c in sums()]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    train_two_steps(recipe(tmp_path, {"name": "sft", "path": str(path)}))


def test_train_dpo_on_implicit_prompts(tmp_path):
    rows = [{"chosen": [user(p), assistant(c)], "rejected": [user(p), assistant(c + "1")]} for p, c in sums()]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    steps = train_two_steps(recipe(tmp_path, {"name": "preference", "path": str(path)}, loss="dpo"))
    assert steps[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)  # the reference is the policy at start


def test_train_on_a_dataset_dict_folder(tmp_path):
    rows = [{"prompt": p, "completion": c} for p, c in sums()]
    folder = save_dict(tmp_path / "hf", rows, rows[:4])
    train_two_steps(recipe(tmp_path, {"name": "sft", "path": str(folder), "eval_split": "test"}))
    assert read_metrics(tmp_path / "run", split="eval")


# --------------------------------------------------------------------------------------
# rollout (GRPO/PPO prompts): chat messages rendered with the generation cue
# --------------------------------------------------------------------------------------


def rollout(tmp_path: Path, tok, rows: list[Any]) -> DataSplits:
    from aligntk_rl.data import RolloutData

    data = RolloutData(RolloutData.Config(path=write_jsonl(tmp_path / "prompts.jsonl", rows)))
    return data.load(DataContext(tokenizer=tok, seed=0, rewards=[(1.0, lambda p, c, **f: [0.0] * len(c))]))


def test_rollout_chat_prompts_are_the_rendered_template_with_the_generation_cue(tmp_path, tok):
    (example,) = rollout(tmp_path, tok, [{"prompt": [user("1+2=")], "completion": "3"}]).train
    text = tok.apply_chat_template([user("1+2=")], tokenize=False, add_generation_prompt=True)
    assert example["prompt"] == text and example["reference"] == "3"
    assert example["prompt_ids"] == tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": [user("1+2="), assistant("3")]}, r"prompts.jsonl:1: 'prompt' must not end with an assistant"),
        ({"prompt": [{"role": "user"}]}, r"prompts.jsonl:1: "),
        ({"prompt": 5}, r"prompts.jsonl:1: expected a non-empty string or a list of messages under 'prompt'"),
    ],
)
def test_rollout_bad_chat_prompt_is_one_line_naming_it(tmp_path, tok, row, message):
    one_line_error(message, lambda: rollout(tmp_path, tok, [row]))
