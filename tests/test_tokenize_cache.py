"""Parallel tokenization (``num_proc``) and the tokenization cache of file-based data.

Whatever the path (one process or several, cold or warm cache) the examples, their order,
the data report and the first error must be those of the plain serial read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from aligntk import DataContext, DataError, DataSplits
from aligntk.datafiles import in_memory_rows, resolve_num_proc, tokenized_cache_dir
from aligntk.testing import char_tokenizer
from aligntk_po.data import PreferenceData
from aligntk_rl.data import RolloutData
from aligntk_sft.data import SFTData
from aligntk_w2s.data import ClassificationData
from helpers import write_jsonl


@pytest.fixture
def tok():
    return char_tokenizer()


def sft_rows(n: int) -> list[dict[str, Any]]:
    """Pairs, chats and texts; every 7th too long for max_length 24 (dropped), some unknown characters."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        if i % 3 == 0:
            rows.append({"prompt": f"{i}+{i}=", "completion": str(2 * i)})
        elif i % 3 == 1:
            rows.append({"messages": [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": f"{i}!"}]})
        else:
            rows.append({"text": f"t{i}" + ("~" if i % 5 == 0 else "")})  # "~" is not in the vocabulary
        if i % 7 == 0:
            rows[-1] = {"prompt": "9" * 30, "completion": "1"}
    return rows


def pref_rows(n: int) -> list[dict[str, Any]]:
    return [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2) * (1 + i % 9)} for i in range(n)]


def load(component: type, path: Path, tok: Any, seed: int = 0, **options: Any) -> DataSplits:
    return component(component.Config(path=path, **options)).load(DataContext(tokenizer=tok, seed=seed))


def as_dict(splits: DataSplits) -> dict[str, Any]:
    r = splits.report
    report = {"rows": r.rows, "skipped": list(r.skipped.items()), "unknown_tokens": r.unknown_tokens}
    return {"train": list(splits.train), "eval": list(splits.eval), "report": report}


def entries(root: Path | None = None) -> list[Path]:
    root = root or tokenized_cache_dir()
    return sorted(p for p in root.iterdir()) if root.is_dir() else []


class Counting:
    """Counts calls of a component's per-row tokenizing method (only in this process: num_proc 1)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type, name: str):
        self.calls = 0
        original = getattr(cls, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, counted)


SFT = {"max_length": 24, "truncation": "drop", "eval_fraction": 0.1, "num_proc": 1}


# --------------------------------------------------------------------------------------
# Hits, and equal results
# --------------------------------------------------------------------------------------


def test_the_second_run_reads_the_cache_and_tokenizes_nothing(tmp_path, tok, monkeypatch, caplog) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", sft_rows(60))
    encode = Counting(monkeypatch, SFTData, "_encode")
    plain = as_dict(load(SFTData, path, tok, **SFT, cache=False))
    assert encode.calls == 60 and entries() == []
    encode.calls = 0
    with caplog.at_level(logging.INFO, logger="aligntk"):
        cold = as_dict(load(SFTData, path, tok, **SFT))
        assert encode.calls == 60 and len(entries()) == 1
        assert "tokenization cache" not in caplog.text
        encode.calls = 0
        warm = as_dict(load(SFTData, path, tok, **SFT))
    assert encode.calls == 0
    assert f"data: {path}: " in caplog.text and "examples from the tokenization cache" in caplog.text
    assert plain == cold == warm
    # The report too: rows dropped by truncation and unknown tokens, as counted when tokenizing.
    (reason, dropped), = warm["report"]["skipped"]
    assert reason == "longer than max_length" and dropped >= 9
    assert warm["report"]["unknown_tokens"][str(path)]["unknown"] > 0
    assert sum(warm["report"]["rows"].values()) == 60 - dropped
    assert not [p for p in tokenized_cache_dir().iterdir() if p.name.endswith(".tmp")]


def test_train_and_eval_files_have_their_own_entries(tmp_path, tok) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows(30))
    eval_ = write_jsonl(tmp_path / "eval.jsonl", sft_rows(12))
    options = {"max_length": 24, "truncation": "drop", "eval_path": eval_}
    cold = as_dict(load(SFTData, train, tok, **options, cache=False))
    assert as_dict(load(SFTData, train, tok, **options)) == cold
    assert len(entries()) == 2
    assert as_dict(load(SFTData, train, tok, **options)) == cold


def test_options_that_do_not_encode_keep_the_cache(tmp_path, tok, monkeypatch) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", sft_rows(20))
    load(SFTData, path, tok, **SFT)
    encode = Counting(monkeypatch, SFTData, "_encode")
    for change in ({"eval_fraction": 0.2}, {"packing": True}, {"max_unk_fraction": 0.9}, {"num_proc": "auto"}):
        load(SFTData, path, tok, **{**SFT, **change})
    load(SFTData, path, tok, seed=5, **SFT)  # the seed only picks the eval_fraction hold-out, after the cache
    assert encode.calls == 0 and len(entries()) == 1


def test_the_cache_dir_option_and_the_env_var(tmp_path, tok) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", sft_rows(10))
    load(SFTData, path, tok, **SFT, cache_dir=tmp_path / "mine")
    assert len(entries(tmp_path / "mine")) == 1 and entries() == []
    assert tokenized_cache_dir().parent.name.startswith("aligntk-cache")  # tests/conftest.py's fixture


# --------------------------------------------------------------------------------------
# Misses
# --------------------------------------------------------------------------------------


def test_a_changed_file_tokenizer_or_option_misses(tmp_path, tok, monkeypatch) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", sft_rows(20))
    first = as_dict(load(SFTData, path, tok, **SFT))
    encode = Counting(monkeypatch, SFTData, "_encode")

    rows = sft_rows(20)
    rows[3] = {"prompt": "5+5=", "completion": "10"}
    write_jsonl(path, rows)  # same size and name, other contents
    changed = as_dict(load(SFTData, path, tok, **SFT))
    assert encode.calls == 20 and changed != first
    assert changed == as_dict(load(SFTData, path, tok, **SFT, cache=False))

    encode.calls = 0
    other = char_tokenizer()
    other.chat_template = other.chat_template.replace(": ", "> ")  # same vocabulary, other template
    assert as_dict(load(SFTData, path, other, **SFT)) != changed
    assert encode.calls == 20

    encode.calls = 0
    load(SFTData, path, tok, **{**SFT, "max_length": 25})
    load(SFTData, path, tok, **{**SFT, "include_prompt": True})
    assert encode.calls == 40
    encode.calls = 0
    load(SFTData, path, tok, **SFT)
    assert encode.calls == 0 and len(entries()) == 5


def test_in_memory_rows_are_keyed_by_their_content(tok) -> None:
    def run(rows: list[dict[str, Any]]) -> DataSplits:
        with in_memory_rows("train_dataset", rows) as path:
            return load(SFTData, path, tok, **SFT)

    a, b = sft_rows(10), sft_rows(10)
    b[0] = {"prompt": "7+7=", "completion": "14"}
    assert as_dict(run(a)) != as_dict(run(b))
    assert as_dict(run(b)) == as_dict(run(b)) and len(entries()) == 2


# --------------------------------------------------------------------------------------
# Several processes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("component,rows,options", [
    (SFTData, sft_rows(400), {"max_length": 24, "truncation": "drop"}),
    (PreferenceData, pref_rows(300), {"max_length": 8, "truncation": "drop"}),
], ids=["sft", "preference"])
def test_two_processes_give_the_same_examples_in_the_same_order(tmp_path, tok, component, rows, options) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    serial = as_dict(load(component, path, tok, **options, num_proc=1, cache=False))
    parallel = as_dict(load(component, path, tok, **options, num_proc=2, cache=False))
    assert serial == parallel
    assert serial["report"]["skipped"]  # some rows were dropped, and counted the same


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_bad_row_names_its_file_and_row_and_is_never_cached(tmp_path, tok, num_proc) -> None:
    rows = pref_rows(300)
    rows[250] = {"prompt": "1+1=", "chosen": 2, "rejected": "3"}  # in the second process's half
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as err:
        load(PreferenceData, path, tok, num_proc=num_proc)
    assert str(err.value) == f"{path}:251: 'chosen' must be a string when the prompt is, got int"
    assert entries() == []


@pytest.mark.parametrize("num_proc", [1, 2])
def test_the_first_error_is_the_one_a_serial_pass_finds(tmp_path, tok, num_proc) -> None:
    rows: list[dict[str, Any]] = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(300)]
    rows[20] = {"prompt": "9" * 40, "completion": "1"}  # too long: an error only when tokenized
    rows[280] = {"prompt": "1+1=", "completion": 2}  # a bad shape: found by the first pass, so first
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{path}:281: 'completion' must be a string, got int$"):
        load(SFTData, path, tok, max_length=24, truncation="error", num_proc=num_proc)
    rows[280] = {"prompt": "1+1=", "completion": "2"}
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=rf"^{path}:21: "):
        load(SFTData, path, tok, max_length=24, truncation="error", num_proc=num_proc)
    # A line that is not JSON comes after a bad shape on an earlier line, before one on a later line.
    lines = path.read_text().splitlines()
    lines[200] = "{not json"
    lines[100] = json.dumps({"prompt": "1+1=", "completion": 2})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:101: 'completion'"):
        load(SFTData, path, tok, num_proc=num_proc)
    lines[100] = json.dumps({"prompt": "1+1=", "completion": "2"})
    lines[250] = json.dumps({"prompt": "1+1=", "completion": 2})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:201: not valid JSON"):
        load(SFTData, path, tok, num_proc=num_proc)
    assert entries() == []


def test_auto_uses_one_process_for_small_files() -> None:
    assert resolve_num_proc("auto", 100) == 1
    assert resolve_num_proc(4, 2) == 2
    assert resolve_num_proc("auto", 10**6) >= 1


# --------------------------------------------------------------------------------------
# Damaged entries
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta", "missing"])
def test_a_damaged_entry_is_ignored_with_a_warning_and_rebuilt(tmp_path, tok, caplog, damage) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", sft_rows(30))
    fresh = as_dict(load(SFTData, path, tok, **SFT))
    (entry,) = entries()
    blob = entry / "examples.json"
    if damage == "truncate":
        blob.write_bytes(blob.read_bytes()[:50])
    elif damage == "flip":
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    elif damage == "meta":
        (entry / "entry.json").write_text("{")
    else:
        blob.unlink()
    with caplog.at_level(logging.WARNING, logger="aligntk"):
        rebuilt = as_dict(load(SFTData, path, tok, **SFT))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "cache" in r.getMessage()]
    assert len(warnings) == 1 and "ignoring a damaged tokenization cache entry" in warnings[0]
    assert "\n" not in warnings[0]
    assert rebuilt == fresh
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="aligntk"):
        assert as_dict(load(SFTData, path, tok, **SFT)) == fresh
    assert "examples from the tokenization cache" in caplog.text and "ignoring a damaged" not in caplog.text


# --------------------------------------------------------------------------------------
# The other file-based components
# --------------------------------------------------------------------------------------


def test_preference_classification_and_prompts_use_the_cache(tmp_path, tok, caplog) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pref_rows(20))
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": f"{i} {i}", "label": i % 2} for i in range(20)])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(20)])

    def rollout(**options: Any) -> DataSplits:
        data = RolloutData(RolloutData.Config(path=prompts, **options))
        return data.load(DataContext(tokenizer=tok, seed=0, rewards=[(1.0, object())]))

    cases = [
        (lambda **o: load(PreferenceData, pairs, tok, **o), {"max_length": 8, "truncation": "drop"}),
        (lambda **o: load(ClassificationData, texts, tok, **o), {"eval_fraction": 0.25}),
        (rollout, {"eval_fraction": 0.25}),
    ]
    for run, options in cases:
        plain = as_dict(run(**options, cache=False))
        assert as_dict(run(**options)) == plain
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="aligntk"):
            assert as_dict(run(**options)) == plain
        assert "examples from the tokenization cache" in caplog.text
    assert len(entries()) == 3
    assert as_dict(rollout(eval_fraction=0.25, num_generations=2)) == as_dict(rollout(eval_fraction=0.25))
    assert len(entries()) == 3  # sampling options are not encoding


def test_soft_labels_are_applied_after_the_cache(tmp_path, tok) -> None:
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": f"{i} {i}", "label": i % 2} for i in range(6)])
    soft = write_jsonl(tmp_path / "soft.jsonl", [{"probs": [0.25, 0.75]} for _ in range(6)])
    plain = load(ClassificationData, texts, tok)
    labelled = load(ClassificationData, texts, tok, soft_labels_path=soft)  # a hit: soft labels are not encoding
    assert len(entries()) == 1
    assert [e["soft_labels"] for e in labelled.train] == [[0.25, 0.75]] * 6
    assert [e["index"] for e in labelled.train] == list(range(6))
    assert [e["input_ids"] for e in labelled.train] == [e["input_ids"] for e in plain.train]


def test_the_benchmark_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import runpy
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "tokenize" / "run.py"
    argv = ["run.py", "--rows", "150", "--vocab", "400", "--repeats", "1", "--num-proc", "1",
            "--variants", "serial,cold,warm", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(result["rows_per_s"]) == {"serial", "cold", "warm"}
    assert "warm cache" in (tmp_path / "out" / "results.md").read_text()


def test_entries_are_json_and_round_trip_tuples_and_nested_values() -> None:
    from aligntk.datafiles import _from_json, _to_json

    examples = [{"input_ids": [1, 2], "pair": (3, (4, 5)), "score": 0.1 + 0.2, "meta": {"k": None, "b": True}}]
    assert _from_json(json.loads(json.dumps(_to_json(examples)))) == examples
    with pytest.raises(TypeError, match="cannot be cached"):
        _to_json([{"x": object()}])
    with pytest.raises(TypeError, match="cannot be cached"):
        _to_json([{1: "non-string key"}])
