"""The weak-to-strong protocol: teacher labels computed once, and a tiny end-to-end run."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from click.testing import CliRunner

from aligntk import AligntkError, DataContext
from aligntk.cli import main
from aligntk.testing import TINY_LLAMA, char_tokenizer, read_metrics, run_recipe

from aligntk_w2s.data import ClassificationData, ClassificationDataConfig
from aligntk_w2s.labelling import label_examples, write_labels
from aligntk_w2s.protocol import collect_results, read_protocol, run_protocol

REPO = Path(__file__).resolve().parents[1]


def digits_task(folder: Path, n_train: int = 96, n_test: int = 64, seed: int = 0) -> dict[str, Path]:
    """Digit strings labelled 1 when the first digit is below 5: trivially learnable."""
    folder.mkdir(parents=True, exist_ok=True)
    char_tokenizer("0123456789").save_pretrained(folder / "tokenizer")
    rng = random.Random(seed)
    paths = {}
    for name, n in (("train", n_train), ("test", n_test)):
        paths[name] = folder / f"{name}.jsonl"
        with paths[name].open("w") as f:
            for _ in range(n):
                text = "".join(rng.choice("0123456789") for _ in range(6))
                f.write(json.dumps({"text": text, "label": int(int(text[0]) < 5)}) + "\n")
    paths["tokenizer"] = folder / "tokenizer"
    return paths


def classifier(hidden: int = 64, layers: int = 2) -> dict[str, Any]:
    heads = 4 if hidden >= 32 else 2
    return {
        **TINY_LLAMA,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "num_labels": 2,
    }


def test_teacher_forward_runs_once_per_example_however_many_epochs(tmp_path: Path) -> None:
    paths = digits_task(tmp_path / "assets", n_train=24)
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tokenizer = char_tokenizer("0123456789")
    options = {**classifier(16, 1), "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    teacher = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**options))
    seen: list[int] = []
    teacher.register_forward_hook(lambda _m, _a, kwargs, _out: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)

    data = ClassificationData(ClassificationDataConfig(path=paths["train"]))
    examples = data.load(DataContext(tokenizer=tokenizer, seed=0)).train
    labels = write_labels(tmp_path / "run" / "weak_labels.jsonl", label_examples(teacher, examples, data.collate, 5))
    assert sum(seen) == len(examples) == 24

    # The student trains 3 epochs (9 steps of 8 examples) on the cached labels.
    recipe = {
        "output_dir": str(tmp_path / "student"),
        "model": {"config": classifier(), "tokenizer": str(paths["tokenizer"]), "task": "sequence_classification"},
        "data": {"name": "classification", "path": str(paths["train"]), "soft_labels_path": str(labels)},
        "loss": {"name": "w2s_ce"},
        "update": {"name": "full", "learning_rate": 1e-3, "warmup_steps": 0},
        "train": {"max_steps": 9, "batch_size": 8},
    }
    result = run_recipe(recipe)
    assert result.steps == 9
    assert sum(seen) == 24, "the teacher ran again while the student trained"
    assert read_metrics(tmp_path / "student")[-1]["step"] == 9


def protocol_recipe(tmp_path: Path, **changes: Any) -> Path:
    paths = digits_task(tmp_path / "assets")
    tokenizer = str(paths["tokenizer"])
    raw: dict[str, Any] = {
        "output_dir": str(tmp_path / "w2s"),
        "seeds": [0],
        "data": {"path": str(paths["train"]), "test_path": str(paths["test"]), "num_classes": 2, "max_length": 16},
        # The weak model is deliberately weak: tiny and trained for two steps.
        "weak": {
            "model": {"config": classifier(16, 1), "tokenizer": tokenizer, "task": "sequence_classification"},
            "train": {"max_steps": 2},
        },
        "strong": {
            "model": {"config": classifier(), "tokenizer": tokenizer, "task": "sequence_classification"},
        },
        "train": {"max_steps": 24, "batch_size": 16, "eval_every": 8, "device": "cpu"},
        "update": {"name": "full", "learning_rate": 3e-3, "warmup_steps": 0},
        "losses": [{"name": "w2s_ce"}, {"name": "w2s_aux_conf"}],
    }
    raw.update(changes)
    path = tmp_path / "w2s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_protocol_runs_end_to_end(tmp_path: Path) -> None:
    results = run_protocol(protocol_recipe(tmp_path))
    out = tmp_path / "w2s"
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert (out / "results.md").read_text().startswith("# Weak-to-strong results")
    run = saved["runs"][0]
    assert run["ceiling"]["final"] > run["weak"]["final"]
    for loss in ("w2s_ce", "w2s_aux_conf"):
        assert set(run["strong"][loss]) == {"final", "best", "best_step"}
        for when in ("final", "best"):
            expected = (run["strong"][loss][when] - run["weak"][when]) / (run["ceiling"][when] - run["weak"][when])
            assert run["pgr"][loss][when] == pytest.approx(expected)
            assert saved["summary"][when]["pgr"][loss]["n"] == 1
    labels = out / "seed_0" / "weak" / "weak_labels.jsonl"
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert len(rows) == 48 and all(len(r["probs"]) == 2 for r in rows)
    # Each student read the cached labels file.
    student = yaml.safe_load((out / "seed_0" / "strong_w2s_ce" / "recipe.yaml").read_text())
    assert student["data"]["soft_labels_path"] == str(labels.resolve())
    assert [r["step"] for r in read_metrics(out / "seed_0" / "ceiling", "eval")] == [0, 8, 16, 24]
    # Finished seeds can be reported again from their run folders alone.
    assert collect_results(out, ["w2s_ce", "w2s_aux_conf"]) == saved
    trained = (out / "seed_0" / "ceiling" / "metrics.jsonl").stat().st_mtime_ns
    assert run_protocol(protocol_recipe(tmp_path), skip_finished=True) == results
    assert (out / "seed_0" / "ceiling" / "metrics.jsonl").stat().st_mtime_ns == trained


def test_protocol_refuses_pgr_when_the_ceiling_does_not_beat_weak(tmp_path: Path) -> None:
    # Roles swapped: the "strong" model is tiny, trains one step and cannot beat the weak one.
    tokenizer = str(tmp_path / "assets" / "tokenizer")
    recipe = protocol_recipe(
        tmp_path,
        losses=[{"name": "w2s_ce"}],
        weak={"model": {"config": classifier(), "tokenizer": tokenizer, "task": "sequence_classification"}},
        strong={
            "model": {"config": classifier(16, 1), "tokenizer": tokenizer, "task": "sequence_classification"},
            "train": {"max_steps": 1},
            "update": {"name": "full", "learning_rate": 1e-9, "warmup_steps": 0},
        },
    )
    with pytest.raises(AligntkError, match="PGR refused.*does not beat the weak"):
        run_protocol(recipe)
    assert (tmp_path / "w2s" / "results.json").exists()


def test_command_is_registered_and_reports_recipe_errors(tmp_path: Path) -> None:
    recipe = protocol_recipe(tmp_path)
    result = CliRunner().invoke(main, ["w2s", str(recipe), "losses.0.nmae=x"])
    assert result.exit_code == 1
    assert "losses.0.name" in result.output or "nmae" in result.output
    result = CliRunner().invoke(main, ["w2s", str(recipe), "seeds=[]"])
    assert result.exit_code == 1 and "seeds" in result.output


@pytest.mark.parametrize("recipe", ["recipes/w2s.yaml", "benchmarks/w2s/w2s_minilm.yaml"])
def test_shipped_protocol_recipes_validate(recipe: str) -> None:
    protocol = read_protocol(REPO / recipe)
    assert [loss.key for loss in protocol.losses] == ["w2s_ce", "w2s_aux_conf"]
