"""The quickstart recipe: valid, runs, and (slow) really teaches the task."""

from __future__ import annotations

from pathlib import Path

import pytest

from aligntk import load_plugins
from aligntk.engine import train
from aligntk.recipe import read_recipe, validate_recipe
from aligntk.testing import read_metrics

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def run(tmp_path: Path, *overrides: str):
    plugins = load_plugins()
    raw = read_recipe(QUICKSTART, [f"output_dir={tmp_path / 'run'}", *overrides])
    return train(validate_recipe(raw, plugins.registry, source=QUICKSTART), plugins)


def test_quickstart_runs_a_few_steps(tmp_path: Path) -> None:
    result = run(tmp_path, "train.max_steps=3", "train.eval_every=null", "evaluators.0.limit=16")
    assert result.first_eval["exact_match"] == 0.0
    assert [r["step"] for r in read_metrics(result.run_dir)] == [3]  # log_every 10, last step always logged


@pytest.mark.slow
def test_quickstart_learns_addition(tmp_path: Path) -> None:
    result = run(tmp_path)
    assert result.first_eval["exact_match"] < 0.05
    assert result.last_eval["exact_match"] > 0.8
