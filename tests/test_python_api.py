"""``aligntk.train``: recipes from Python with in-memory models, datasets and reward functions."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

import aligntk
from aligntk import DataError
from aligntk.engine import RunResult
from aligntk.testing import char_tokenizer, read_metrics, tiny_model


def _addition(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(50), rng.randrange(50)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return rows


def _recipe(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    """No ``model`` section and no data paths: both come in memory."""
    return {
        "output_dir": str(tmp_path / "run"),
        "data": {"name": "sft"},
        "loss": {"name": "sft"},
        "update": {"name": "full", "learning_rate": 3e-3, "warmup_steps": 0},
        "train": {"max_steps": 2, "batch_size": 4, "device": "cpu"},
        **changes,
    }


def test_a_recipe_dict_with_an_in_memory_model_and_datasets_trains(tmp_path: Path) -> None:
    from datasets import Dataset

    tok = char_tokenizer()
    model = tiny_model(tok)
    result = aligntk.train(
        _recipe(tmp_path),
        model=model,
        tokenizer=tok,
        train_dataset=Dataset.from_list(_addition(16, 0)),
        eval_dataset=Dataset.from_list(_addition(8, 1)),
    )
    assert isinstance(result, RunResult)
    assert result.steps == 2 and result.run_dir == tmp_path / "run"
    steps = [r["step"] for r in read_metrics(result.run_dir)]
    assert steps == [1, 2]
    assert read_metrics(result.run_dir, "eval"), "the eval dataset was evaluated"
    assert (result.run_dir / "model" / "config.json").is_file()
    saved = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())
    assert saved["model"]["path"] == "(in-memory model)"
    assert (saved["data"]["path"], saved["data"]["eval_path"]) == (
        "/aligntk:in-memory/train_dataset", "/aligntk:in-memory/eval_dataset"
    )


def test_a_recipe_path_works_and_datasets_replace_its_files(tmp_path: Path) -> None:
    tok = char_tokenizer()
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, data={"name": "sft", "path": "missing.jsonl"})))
    with pytest.raises(aligntk.RecipeError, match="file not found"):
        aligntk.train(path, model=tiny_model(tok), tokenizer=tok)
    result = aligntk.train(path, model=tiny_model(tok), tokenizer=tok, train_dataset=_addition(8, 0))
    assert result.steps == 2 and len(read_metrics(result.run_dir)) == 2


def test_a_bad_row_in_an_in_memory_dataset_is_named(tmp_path: Path) -> None:
    from datasets import Dataset

    rows = _addition(8, 0)
    rows[4] = {"prompt": None, "completion": "2"}  # a missing prompt
    tok = char_tokenizer()
    with pytest.raises(DataError) as info:
        aligntk.train(_recipe(tmp_path), model=tiny_model(tok), tokenizer=tok, train_dataset=Dataset.from_list(rows))
    message = str(info.value)
    assert message.startswith("train_dataset: row 5: ") and "\n" not in message, message
    with pytest.raises(DataError, match=r"^eval_dataset: row 2: expected an object"):
        aligntk.train(
            _recipe(tmp_path), model=tiny_model(tok), tokenizer=tok, train_dataset=_addition(8, 0),
            eval_dataset=[{"prompt": "1+1=", "completion": "2"}, "not a row"],
        )


def test_an_in_memory_model_needs_a_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(aligntk.RecipeError, match="tokenizer="):
        aligntk.train(_recipe(tmp_path), model=tiny_model(char_tokenizer()), train_dataset=_addition(8, 0))


def test_grpo_with_a_python_reward_function_logs_its_mean(tmp_path: Path) -> None:
    seen: list[int] = []

    def has_one(prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float]:
        assert len(prompts) == len(completions) == len(fields["references"])
        seen.append(len(completions))
        return [1.0 if "1" in c else 0.0 for c in completions]

    tok = char_tokenizer("0123456789+=")
    recipe = _recipe(
        tmp_path,
        data={"name": "rollout", "num_generations": 4, "max_new_tokens": 4},
        loss={"name": "grpo", "beta": 0.0},
        train={"max_steps": 3, "batch_size": 4, "device": "cpu"},
    )
    result = aligntk.train(recipe, model=tiny_model(tok), tokenizer=tok, train_dataset=_addition(8, 0), rewards=[has_one])
    records = read_metrics(result.run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert seen and all(n == seen[0] for n in seen)
    for r in records:
        assert 0.0 <= r["reward/has_one"] <= 1.0
        # the only reward, weight 1: the total is that reward's mean
        assert r["reward/has_one"] == pytest.approx(r["reward"])


def test_rewards_must_be_callables(tmp_path: Path) -> None:
    with pytest.raises(aligntk.RecipeError, match=r"rewards\[0\]"):
        aligntk.train(_recipe(tmp_path), rewards=["ones"])  # type: ignore[list-item]
