"""Samples: at each evaluation a few generations per evaluator go to ``<output_dir>/samples.jsonl``.

A tiny run with two ``exact_match`` evaluators (4 and 2 samples) and no sink turned on; a
second run is interrupted after an evaluation past its checkpoint and resumed, and its
samples of the evaluations run twice must be there once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from aligntk import Sample
from aligntk.testing import InterruptAt, char_tokenizer, read_metrics, run_recipe, tiny_model, write_tiny_assets
from aligntk_eval import GenerationExactMatch


def _read(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def _eval_rows(folder: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("samples")
    recipe = write_tiny_assets(folder, rows=16)
    recipe["train"].update(max_steps=2, eval_every=1)
    recipe["evaluators"] = [
        {"name": "exact_match", "max_new_tokens": 3, "limit": 6},  # samples: 4 by default
        {"name": "exact_match", "max_new_tokens": 3, "limit": 2, "samples": 2},
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGNTK_CACHE", str(tmp_path_factory.mktemp("cache")))  # as conftest does per test
        run_recipe(recipe)
    return folder, Path(recipe["output_dir"])


def test_each_evaluation_has_its_samples(run: tuple[Path, Path]) -> None:
    folder, run_dir = run
    samples = _read(run_dir)
    rows = _eval_rows(folder)
    assert [(s["step"], s["evaluator"], s["index"]) for s in samples] == [
        (step, evaluator, i)
        for step in (0, 1, 2)
        for evaluator, n in (("exact_match.0", 4), ("exact_match.1", 2))
        for i in range(n)
    ]
    for s in samples:
        assert set(s) == {"step", "evaluator", "index", "prompt", "completion", "reference", "score"}
        # The first examples of the eval split, the same ones at every evaluation.
        assert (s["prompt"], s["reference"]) == (rows[s["index"]]["prompt"], rows[s["index"]]["completion"])
        assert s["score"] == float(s["completion"].strip() == s["reference"].strip())
    # Evaluator 1 shows every example it scores, so its scores average to its metric
    # (the later evaluator's exact_match is the one the eval record keeps).
    for record in read_metrics(run_dir, "eval"):
        shown = [s["score"] for s in samples if s["step"] == record["step"] and s["evaluator"] == "exact_match.1"]
        assert record["exact_match"] == sum(shown) / len(shown)


def test_last_samples_are_the_final_models_greedy_answers(run: tuple[Path, Path]) -> None:
    folder, run_dir = run
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    rows = _eval_rows(folder)[:4]
    examples = [
        {"prompt_ids": tokenizer(r["prompt"])["input_ids"], "reference": r["completion"]} for r in rows
    ]
    answers = GenerationExactMatch(GenerationExactMatch.Config(max_new_tokens=3)).generate(model, tokenizer, examples)
    last = [s["completion"] for s in _read(run_dir) if s["step"] == 2 and s["evaluator"] == "exact_match.0"]
    assert last == answers


def test_samples_file_is_in_the_manifest_and_no_sink_wrote(run: tuple[Path, Path]) -> None:
    _, run_dir = run
    written = json.loads((run_dir / "aligntk-run.json").read_text())["written"]
    assert "samples.jsonl" in written
    # Sinks are off unless the recipe turns them on: none of their files is there.
    for name in ("tensorboard", "wandb", "mlruns", "metrics.csv", "sinks.json"):
        assert not (run_dir / name).exists(), name


def test_evaluator_keeps_its_first_answers_or_none() -> None:
    tokenizer = char_tokenizer("0123456789+=")
    model = tiny_model(tokenizer).eval()
    examples = [
        {"prompt_ids": tokenizer(p)["input_ids"], "reference": r} for p, r in (("1+2=", "3"), ("4+4=", "8"), ("9+0=", "9"))
    ]
    evaluator = GenerationExactMatch(GenerationExactMatch.Config(max_new_tokens=2, samples=2))
    assert GenerationExactMatch.capabilities(evaluator.config).samples is True
    metrics = evaluator(model, tokenizer, examples)
    answers = evaluator.generate(model, tokenizer, examples)
    expected = [Sample(p, a, r, float(a.strip() == r)) for (p, r), a in zip((("1+2=", "3"), ("4+4=", "8")), answers)]
    assert evaluator.samples() == expected
    assert metrics["exact_match"] == sum(float(a.strip() == e["reference"]) for a, e in zip(answers, examples)) / 3

    silent = GenerationExactMatch(GenerationExactMatch.Config(max_new_tokens=2, samples=0))
    assert GenerationExactMatch.capabilities(silent.config).samples is False
    silent(model, tokenizer, examples)
    assert silent.samples() == []


def test_resume_keeps_one_sample_per_evaluation(tmp_path: Path) -> None:
    recipe = write_tiny_assets(tmp_path, rows=16)
    recipe["train"].update(max_steps=5, eval_every=1, save_every=2)
    recipe["evaluators"] = [{"name": "exact_match", "max_new_tokens": 3, "limit": 2, "samples": 2}]
    run_dir = Path(recipe["output_dir"])
    with pytest.raises(KeyboardInterrupt):  # after step 4's record: evaluation 3 is past checkpoint 2
        run_recipe(recipe, plugins={"crash": InterruptAt(4)})
    before = _read(run_dir)
    assert sorted({s["step"] for s in before}) == [0, 1, 2, 3]
    run_recipe(recipe, resume=True)
    after = _read(run_dir)
    assert [(s["step"], s["index"]) for s in after] == [(step, i) for step in range(6) for i in range(2)]
    # An exact resume gives the same answers at the evaluation it ran again.
    assert [s for s in after if s["step"] <= 3] == before
