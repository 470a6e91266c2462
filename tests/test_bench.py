"""``aligntk bench``: suites of variants x seeds, failures kept apart, tables and plots written."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from aligntk import PluginError, RecipeError, hookimpl, load_plugins
from aligntk.bench import RunRecord, read_suite, run_suite
from aligntk.cli import main


@pytest.fixture
def suite_dir(tiny: dict[str, Any], tmp_path: Path) -> Path:
    """A folder with ``base.yaml`` (the tiny SFT recipe, 2 steps); suites are written next to it."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny))
    return tmp_path


def write_suite(folder: Path, suite: dict[str, Any]) -> Path:
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump({"recipe": "base.yaml", **suite}))
    return path


def run(path: Path | str, out: Path, **kwargs: Any) -> dict[tuple[str, int], RunRecord]:
    records = run_suite(path, load_plugins(), out=out, echo=lambda _line: None, **kwargs)
    return {(r.variant, r.seed): r for r in records}


def test_two_variants_two_seeds_write_tables_and_plots(suite_dir: Path) -> None:
    path = write_suite(
        suite_dir,
        {"seeds": [0, 1], "variants": [{"name": "a"}, {"name": "b", "overrides": {"update.learning_rate": 1e-3}}]},
    )
    out = suite_dir / "out"
    records = run(path, out)
    assert sorted(records) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert all(r.status == "ok" and r.steps == 2 and r.tokens > 0 for r in records.values())
    # The seed changes the run: different initial weights, different final loss.
    assert records["a", 0].final_eval["eval_loss"] != records["a", 1].final_eval["eval_loss"]
    assert yaml.safe_load((out / "runs/b/seed1/recipe.yaml").read_text())["update"]["learning_rate"] == 1e-3

    md = (out / "results.md").read_text()
    assert "| variant | seeds | eval_loss | steps |" in md
    for name in ("a", "b"):
        assert f"| {name} | 2/2 | " in md
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["variant"], r["seed"], r["status"]) for r in rows] == [
        ("a", "0", "ok"), ("a", "1", "ok"), ("b", "0", "ok"), ("b", "1", "ok")
    ]
    assert float(rows[0]["eval_loss"]) == pytest.approx(records["a", 0].final_eval["eval_loss"])
    result = json.loads((out / "results.json").read_text())
    summary = {row["variant"]: row for row in result["summary"]}
    losses = [records["a", s].final_eval["eval_loss"] for s in (0, 1)]
    stats = summary["a"]["metrics"]["eval_loss"]
    assert stats["mean"] == pytest.approx(sum(losses) / 2)
    assert (stats["min"], stats["max"]) == (min(losses), max(losses))
    assert summary["a"]["steps"] == 2 and summary["a"]["status"] == "ok"
    assert result["plots"] == ["train_loss.png", "eval_loss.png"]
    for png in result["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_override_fails_that_variant_only(suite_dir: Path) -> None:
    path = write_suite(suite_dir, {"variants": [{"name": "bad", "overrides": {"loss.bta": 1}}, {"name": "good"}]})
    records = run(path, suite_dir / "out")
    bad, good = records["bad", 0], records["good", 0]
    assert bad.status == "failed" and "loss.bta: unknown key" in bad.error and "\n" not in bad.error
    assert good.status == "ok" and good.steps == 2
    md = (suite_dir / "out/results.md").read_text()
    assert "| bad | 0/1 |" in md and "failed" in md
    assert f"bad seed 0 (failed): {bad.error}" in md


def test_init_from_starts_from_the_parent_model(suite_dir: Path) -> None:
    path = write_suite(
        suite_dir,
        {
            "budget": {"max_steps": 3},
            "variants": [{"name": "sft"}, {"name": "more", "init_from": "sft", "overrides": {"train.max_steps": 2}}],
        },
    )
    out = suite_dir / "out"
    records = run(path, out)
    parent, child = records["sft", 0], records["more", 0]
    saved = yaml.safe_load((out / "runs/more/seed0/recipe.yaml").read_text())
    assert Path(saved["model"]["path"]) == (out / "runs/sft/seed0/model").resolve()
    assert saved["model"]["config"] is None
    # The child's evaluation before training is the parent's last: the same weights.
    assert child.first_eval["eval_loss"] == pytest.approx(parent.final_eval["eval_loss"], rel=1e-5)
    # The budget applies to the parent; the child's explicit override wins; totals add the parent.
    assert (parent.steps, child.steps, child.total_steps) == (3, 2, 5)
    assert child.total_tokens == child.tokens + parent.tokens
    assert child.parents == ["sft"]


def test_models_from_gives_a_frozen_role_the_parent_model(suite_dir: Path) -> None:
    # Weak-to-strong within a suite: the student distils a weak variant's trained model.
    path = write_suite(
        suite_dir,
        {
            "variants": [
                {"name": "weak", "overrides": {"model.config.hidden_size": 32}},
                {
                    "name": "student",
                    "models_from": {"models.teacher": "weak"},
                    "overrides": {"loss.name": "token_distill"},
                },
            ]
        },
    )
    out = suite_dir / "out"
    records = run(path, out)
    assert records["student", 0].status == "ok", records["student", 0].error
    saved = yaml.safe_load((out / "runs/student/seed0/recipe.yaml").read_text())
    assert Path(saved["models"]["teacher"]["path"]) == (out / "runs/weak/seed0/model").resolve()
    assert saved["model"]["config"]["hidden_size"] == 64  # the student keeps the base recipe's model
    assert records["student", 0].total_steps == 4


def test_child_of_failed_parent_is_not_run(suite_dir: Path) -> None:
    path = write_suite(
        suite_dir,
        {
            "variants": [
                {"name": "sft", "overrides": {"update.learning_rate": "fast"}},
                {"name": "dpo", "init_from": "sft"},
            ]
        },
    )
    records = run(path, suite_dir / "out")
    assert records["sft", 0].status == "failed" and "update.learning_rate" in records["sft", 0].error
    child = records["dpo", 0]
    assert child.status == "skipped"
    assert child.error == "not run: parent 'sft' (seed 0) did not finish"
    assert not (suite_dir / "out/runs/dpo").exists()


def test_only_runs_the_variant_and_its_parents(suite_dir: Path) -> None:
    path = write_suite(
        suite_dir,
        {"variants": [{"name": "a"}, {"name": "b"}, {"name": "c", "init_from": "a", "overrides": {"train.max_steps": 1}}]},
    )
    assert sorted(run(path, suite_dir / "out", only=["c"])) == [("a", 0), ("c", 0)]


@pytest.mark.parametrize(
    ("suite", "expected"),
    [
        ({"variants": [{"name": "a", "overides": {}}]}, "variants.0.overides: unknown key, did you mean 'overrides'?"),
        ({"variants": [{"name": "a"}], "budget": {"max_step": 3}}, "budget.max_step: unknown key"),
        ({"variants": [{"name": "a"}], "seeds": []}, "seeds: List should have at least 1 item"),
        ({"variants": []}, "variants: List should have at least 1 item"),
        (
            {"variants": [{"name": "a"}, {"name": "b", "init_from": "aa"}]},
            "variants.1.init_from: unknown variant 'aa', did you mean 'a'?",
        ),
        ({"variants": [{"name": "a"}, {"name": "a"}]}, "variants.1.name: variant 'a' is named twice"),
        (
            {"variants": [{"name": "a", "models_from": {"teacher": "a"}}]},
            "variants.0.models_from.teacher: expected 'model' or 'models.ROLE'",
        ),
        (
            {"variants": [{"name": "a", "init_from": "b"}, {"name": "b", "init_from": "a"}]},
            "form a cycle: a -> b -> a",
        ),
        ({"recipe": "missing.yaml", "variants": [{"name": "a"}]}, "recipe: file not found"),
    ],
)
def test_suite_errors_name_the_key(suite_dir: Path, suite: dict[str, Any], expected: str) -> None:
    path = write_suite(suite_dir, suite)
    with pytest.raises(RecipeError, match="^" + str(path)) as info:
        read_suite(path)
    assert expected in str(info.value)


def test_plugin_registered_suite_runs_by_name(tmp_path: Path) -> None:
    plugins = load_plugins()
    assert plugins.suites["example-smoothing"].plugin == "example"
    records = run("example-smoothing", tmp_path / "out")
    assert {k: r.status for k, r in records.items()} == {("sft", 0): "ok", ("smoothed", 0): "ok"}
    # The smoothed variant ran the example plugin's loss, which reports the plain NLL too.
    assert "eval_nll" in records["smoothed", 0].final_eval
    assert "| smoothed | 1/1 |" in (tmp_path / "out/results.md").read_text()
    listing = CliRunner().invoke(main, ["plugins"]).output
    assert "suite     example-smoothing" in listing


def test_suite_name_registered_twice_names_both_plugins() -> None:
    class Again:
        @hookimpl
        def aligntk_register_suites(self, register: Any) -> None:
            register("example-smoothing", "elsewhere.yaml")

    expected = "suite 'example-smoothing' is registered twice: by plugin 'example' and by plugin 'again'"
    with pytest.raises(PluginError, match=expected):
        load_plugins(extra={"again": Again()})


def test_cli_bench_missing_file_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "nope.yaml")], catch_exceptions=False)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert f"{tmp_path / 'nope.yaml'}: no such suite file" in result.stderr
    assert "Traceback" not in result.output


def test_cli_bench_refuses_a_used_folder_without_overwrite(suite_dir: Path) -> None:
    path = write_suite(suite_dir, {"variants": [{"name": "a"}]})
    out = suite_dir / "out"
    out.mkdir()
    (out / "results.md").write_text("old")
    result = CliRunner().invoke(main, ["bench", str(path), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 1 and "give --overwrite" in result.stderr
    result = CliRunner().invoke(main, ["bench", str(path), "--out", str(out), "--overwrite", "seeds=[3]"])
    assert result.exit_code == 0, result.output
    assert "| a | 1/1 |" in (out / "results.md").read_text()
    assert (out / "runs/a/seed3/model").is_dir()


#: What ``run_suite`` passes ``write_results`` besides the runs, for tests that write results directly.
HEADER = {
    "suite": "s",
    "file": "s.yaml",
    "seeds": [0, 1],
    "budget": {},
    "wall_s": 1.0,
    "machine": {"platform": "p", "cpus": 2, "torch": "t", "torch_threads": 1, "load_avg_start": None, "load_avg_end": None},
}


def test_tables_are_written_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aligntk.bench import write_results

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    rec = RunRecord("a", 0, status="ok", steps=2, final_eval={"exact_match": 0.5}, curves={"loss": [[1, 2.0]]})
    write_results(tmp_path, HEADER, [rec])
    md = (tmp_path / "results.md").read_text()
    assert "| a | 1/1 | 0.500 ± 0.000 (0.500 to 0.500) |" in md and "no plots: matplotlib is not installed" in md
    assert not list(tmp_path.glob("*.png"))


def test_suite_metrics_pick_the_table_columns_and_plots(tmp_path: Path) -> None:
    from aligntk.bench import write_results

    curves = {"loss": [[1, 2.0], [2, 1.0]], "eval_loss": [[0, 3.0], [2, 1.0]], "exact_match": [[0, 0.0], [2, 0.5]]}
    records = [
        RunRecord("a", seed, status="ok", steps=2, final_eval={"exact_match": 0.25 * (seed + 1)}, curves=curves)
        for seed in (0, 1)
    ]
    write_results(tmp_path, HEADER, records, metrics=["exact_match"])
    md = (tmp_path / "results.md").read_text()
    assert "| variant | seeds | exact_match | steps |" in md
    assert "| a | 2/2 | 0.375 ± 0.177 (0.250 to 0.500) |" in md
    assert json.loads((tmp_path / "results.json").read_text())["plots"] == ["train_loss.png", "exact_match.png"]
