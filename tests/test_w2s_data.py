"""The ``classification`` data component and the ``accuracy`` evaluator."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from aligntk import DataContext, DataError, Example, load_plugins
from aligntk.testing import char_tokenizer
from helpers import write_jsonl

from aligntk_eval import Accuracy
from aligntk_w2s.data import ClassificationData, ClassificationDataConfig
from aligntk_w2s.labelling import label_examples, write_labels




def load(tmp_path: Path, rows: list[Any], **options: Any) -> tuple[ClassificationData, list[Example]]:
    """The component and its training examples, for ``rows`` written to a file."""
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = ClassificationData(ClassificationDataConfig(path=path, **options))
    return data, list(data.load(DataContext(tokenizer=char_tokenizer("0123456789"), seed=0)).train)


ROWS = [{"text": "12", "label": 0}, {"text": "987", "label": 2}, {"text": "5", "label": 1}]


def test_one_hot_targets_and_ground_truth(tmp_path: Path) -> None:
    data, examples = load(tmp_path, ROWS, num_classes=3)
    batch = data.collate(examples)
    assert batch["input_ids"].shape == (3, 3)
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert batch["soft_labels"].tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert batch["labels_int"].tolist() == [0, 2, 1]
    assert set(batch) == ClassificationData.provides


def test_registered_and_validated_by_name() -> None:
    plugins = load_plugins()
    assert plugins.registry.get("data", "classification", "data.name").cls is ClassificationData
    assert plugins.registry.get("evaluator", "accuracy", "evaluators.0.name").cls is Accuracy


@pytest.mark.parametrize("indexed", [True, False])
def test_soft_labels_file_replaces_targets_not_ground_truth(tmp_path: Path, indexed: bool) -> None:
    probs = [[0.2, 0.3, 0.5], [0.6, 0.4, 0.0], [0.1, 0.1, 0.8]]
    rows = [{"index": i, "probs": p} for i, p in enumerate(probs)] if indexed else [{"probs": p} for p in probs]
    if indexed:
        rows.reverse()  # indexed rows may come in any order
    labels = write_jsonl(tmp_path / "labels.jsonl", rows)
    data, examples = load(tmp_path, ROWS, num_classes=3, soft_labels_path=labels)
    batch = data.collate(examples)
    assert torch.allclose(batch["soft_labels"], torch.tensor(probs))
    assert batch["labels_int"].tolist() == [0, 2, 1]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"text": "1", "label": 0}, {"text": "2", "label": 3}], r"train.jsonl:2: 'label' is 3, outside \[0, 3\)"),
        ([{"text": "1", "label": 0}, {"text": 2, "label": 0}], r"train.jsonl:2: 'text' must be a string, got int"),
        ([{"text": "1", "label": "a"}], r"train.jsonl:1: 'label' must be an integer class, got string"),
        ([{"txt": "1", "label": 0}], r"train.jsonl:1: 'text' must be a string, got null"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, rows: list[Any], message: str) -> None:
    with pytest.raises(DataError, match=message):
        load(tmp_path, rows, num_classes=3)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([{"index": 0, "probs": [1, 0, 0]}, {"index": 0, "probs": [1, 0, 0]}], r"labels.jsonl:2: training row 0 is labelled twice"),
        ([{"index": 7, "probs": [1, 0, 0]}], r"labels.jsonl:1: 'index' must be an integer in \[0, 3\)"),
        ([{"index": 0, "probs": [0.5, 0.5]}], r"labels.jsonl:1: 'probs' has 2 entries, expected num_classes 3"),
        ([{"index": 0, "probs": [0.5, 0.9, 0]}], r"labels.jsonl:1: 'probs' must be non-negative and sum to 1"),
        ([{"index": 0, "probs": [1, 0, 0]}, {"probs": [1, 0, 0]}], r"labels.jsonl:2: mixes rows"),
        ([{"index": 0, "probs": [1, 0, 0]}], r"2 of 3 training rows have no soft label"),
    ],
)
def test_bad_labels_file(tmp_path: Path, labels: list[Any], message: str) -> None:
    path = write_jsonl(tmp_path / "labels.jsonl", labels)
    with pytest.raises(DataError, match=message):
        load(tmp_path, ROWS, num_classes=3, soft_labels_path=path)


class FixedClassifier(torch.nn.Module):
    """Logits from the first token: class = first digit mod C (a known answer per example)."""

    def __init__(self, tokenizer: Any, num_classes: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.digit = {tokenizer.convert_tokens_to_ids(str(d)): d for d in range(10)}
        self.num_classes = num_classes
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        self.calls += 1
        first = torch.tensor([self.digit[int(i)] % self.num_classes for i in input_ids[:, 0]])
        return SimpleNamespace(logits=torch.nn.functional.one_hot(first, self.num_classes).float() * 5 + self.weight)


def test_accuracy_is_argmax_against_ground_truth_in_batches(tmp_path: Path) -> None:
    rows = [{"text": "12", "label": 1}, {"text": "987", "label": 0}, {"text": "5", "label": 2}, {"text": "3", "label": 0}]
    _, examples = load(tmp_path, rows, num_classes=3)
    tokenizer = char_tokenizer("0123456789")
    model = FixedClassifier(tokenizer, 3)
    # Predictions 1 % 3, 9 % 3, 5 % 3, 3 % 3 = [1, 0, 2, 0]: three of the four labels agree.
    examples[3] = {**examples[3], "label": 1}
    result = Accuracy(Accuracy.Config(batch_size=3))(model, tokenizer, examples)
    assert result == {"accuracy": 0.75}
    assert model.calls == 2  # batches of 3 and 1


def test_label_examples_writes_a_file_the_data_reads(tmp_path: Path) -> None:
    data, examples = load(tmp_path, ROWS, num_classes=3)
    tokenizer = char_tokenizer("0123456789")
    probs = label_examples(FixedClassifier(tokenizer, 3), examples, data.collate, batch_size=2)
    assert probs.shape == (3, 3) and torch.allclose(probs.sum(-1), torch.ones(3))
    path = write_labels(tmp_path / "run" / "weak_labels.jsonl", probs)
    again, relabelled = load(tmp_path, ROWS, num_classes=3, soft_labels_path=path)
    assert torch.allclose(again.collate(relabelled)["soft_labels"], probs, atol=1e-6)


def test_label_tokens_of_a_causal_lm_classify(tmp_path: Path) -> None:
    from aligntk import class_logits

    from aligntk.testing import read_metrics, run_recipe, tiny_model, write_tiny_assets

    tok = char_tokenizer("0123456789")
    data, examples = load(tmp_path, ROWS, num_classes=3, label_tokens=["a", "b", "c"])
    batch = data.collate(examples)
    ids = [tok("a", add_special_tokens=False)["input_ids"][0], tok("b", add_special_tokens=False)["input_ids"][0],
           tok("c", add_special_tokens=False)["input_ids"][0]]
    assert batch["label_token_ids"].tolist() == [ids] * 3
    model = tiny_model(tok)
    logits = class_logits(model, batch)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    last = [1, 2, 0]  # the last real token of "12", "987", "5"
    expected = torch.stack([full[i, last[i], ids] for i in range(3)])
    torch.testing.assert_close(logits, expected)
    with pytest.raises(DataError, match="are not single tokens"):
        load(tmp_path, ROWS, num_classes=3, label_tokens=["ab", "b", "c"])

    # Both ways train through the same losses: a causal LM policy with w2s_ce.
    recipe = write_tiny_assets(tmp_path / "assets")
    rows = [{"text": f"{a}{b}", "label": int(a > b)} for a in range(10) for b in range(10)]
    write_jsonl(tmp_path / "cls.jsonl", rows)
    recipe["data"] = {"name": "classification", "path": str(tmp_path / "cls.jsonl"),
                      "eval_path": str(tmp_path / "cls.jsonl"), "label_tokens": ["0", "1"]}
    recipe["loss"] = {"name": "w2s_ce"}
    recipe["evaluators"] = [{"name": "accuracy"}]
    result = run_recipe(recipe, ["train.max_steps=2"])
    assert [r["step"] for r in read_metrics(result.run_dir)] == [1, 2]
    assert 0.0 <= result.last_eval["accuracy"] <= 1.0
