"""The command line: useful help, one-line errors with exit code 1, and nothing lost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from aligntk.cli import main
from aligntk.testing import char_tokenizer


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write(tmp_path: Path, recipe: dict[str, Any]) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def one_line_error(result: Any, expected: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_help_lists_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "validate", "plugins"):
        assert command in result.output
    assert "--resume" in invoke("run", "--help").output


def test_validate_ok_loads_no_model(tiny: dict[str, Any], tmp_path: Path) -> None:
    # An empty model folder: validate checks that it exists, and must not try to load it.
    (tmp_path / "model").mkdir()
    recipe = {**tiny, "model": {"path": str(tmp_path / "model")}}
    result = invoke("validate", write(tmp_path, recipe), "train.max_steps=5")
    assert result.exit_code == 0, result.stderr
    assert "ok (data sft, loss sft, update full)" in result.output


def test_bad_recipe_is_one_line(tiny: dict[str, Any], tmp_path: Path) -> None:
    path = write(tmp_path, tiny)
    one_line_error(invoke("validate", path, "train.lerning_rate=1"), "train.lerning_rate: unknown key")
    one_line_error(invoke("run", path, "loss.name=dpo_typo"), "loss.name: unknown loss 'dpo_typo'")
    one_line_error(invoke("run", str(tmp_path / "nope.yaml")), "recipe file not found")


def test_missing_data_file_names_it(tiny: dict[str, Any], tmp_path: Path) -> None:
    recipe = {**tiny, "data": {**tiny["data"], "path": str(tmp_path / "missing.jsonl")}}
    path = write(tmp_path, recipe)
    for command in ("validate", "run"):  # found before any model loads
        one_line_error(invoke(command, path), f"data.path: file not found: {tmp_path / 'missing.jsonl'}")


def test_bad_data_row_names_file_and_line_and_keeps_earlier_output(tiny: dict[str, Any], tmp_path: Path) -> None:
    path = write(tmp_path, tiny)
    assert invoke("run", path, "train.max_steps=1").exit_code == 0
    run_dir = Path(tiny["output_dir"])
    before = (run_dir / "metrics.jsonl").read_text()
    train = Path(tiny["data"]["path"])
    train.write_text(train.read_text() + '{"prompt": "1+1=", "completion": 2}\n')
    line = len(train.read_text().splitlines())
    one_line_error(invoke("run", path, "train.max_steps=1", "--overwrite"), f"train.jsonl:{line}: 'completion' must be a string, got int")
    assert (run_dir / "metrics.jsonl").read_text() == before  # the failed run wrote nothing over it


def test_tokenizer_without_pad_token_is_a_clear_error(tiny: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "nopad"
    char_tokenizer("0123456789+=", pad=False).save_pretrained(folder)
    recipe = {**tiny, "model": {**tiny["model"], "tokenizer": str(folder)}}
    result = invoke("run", write(tmp_path, recipe))
    one_line_error(result, "has no pad token; set model.pad_token in the recipe (for example model.pad_token: '</s>')")
    fixed = invoke("run", write(tmp_path, recipe), "model.pad_token=</s>", "train.max_steps=1")
    assert fixed.exit_code == 0, fixed.stderr


def test_missing_tokenizer_folder(tiny: dict[str, Any], tmp_path: Path) -> None:
    recipe = {**tiny, "model": {**tiny["model"], "tokenizer": "./no/such/tokenizer"}}
    one_line_error(invoke("run", write(tmp_path, recipe)), "no such model or tokenizer folder")


def test_run_prints_before_and_after(tiny: dict[str, Any], tmp_path: Path) -> None:
    result = invoke("run", write(tmp_path, tiny), "train.max_steps=2")
    assert result.exit_code == 0, result.stderr
    assert "eval_loss: " in result.output and " -> " in result.output
    assert "run folder:" in result.output
    rows = [json.loads(x) for x in (Path(tiny["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]


def test_plugins_verbose_lists_a_lifecycle_plugins_options() -> None:
    result = invoke("plugins", "--verbose")
    lines = result.output.splitlines()
    at = lines.index("    options   plugins.diagnostics (and enabled: bool = True)")
    assert lines[at + 1].strip() == "window: int = 10 (>= 2, > 0)"


def test_plugins_verbose_lists_component_options() -> None:
    result = invoke("plugins", "--verbose")
    assert result.exit_code == 0
    assert "learning_rate: float = 5e-05" in result.output
    assert "truncation: right|left|drop|error = 'right'" in result.output
    assert "path: Path = required" in result.output


def _component_options(output: str, kind: str, name: str) -> list[str]:
    """The option lines ``aligntk plugins --verbose`` prints under one component."""
    lines = output.splitlines()
    start = lines.index(f"    {kind:<9} {name}") + 1
    options = []
    for line in lines[start:]:
        if not line.startswith(" " * 14):
            break
        options.append(line.strip())
    return options


def test_plugins_verbose_shows_factory_defaults_bounds_and_descriptions() -> None:
    result = invoke("plugins", "--verbose")
    assert result.exit_code == 0
    full = _component_options(result.output, "update", "full")
    assert "freeze: list[str] = []" in full  # a default_factory is a default, not "required"
    assert "learning_rates: dict[str, float] = {}" in full  # bounds on its values are not the option's
    assert "learning_rate: float = 5e-05 (> 0)" in full  # PositiveFloat
    sft = _component_options(result.output, "data", "sft")
    assert "max_length: int = 512 (> 0)" in sft  # PositiveInt
    assert "eval_fraction: float = 0.0 (>= 0.0, < 1.0)" in sft  # Field(ge=..., lt=...)
    assert "max_unk_fraction: float|None = None (>= 0.0, <= 1.0)" in sft
    assert "path: Path = required" in sft


def test_option_lines_show_descriptions() -> None:
    from pydantic import Field, PositiveInt

    from aligntk import ComponentConfig
    from aligntk.cli import _options

    class DescribedConfig(ComponentConfig):
        share: float = Field(0.5, gt=0, le=1, description="share of rows kept")
        names: list[str] = Field(default_factory=lambda: ["a"], description="which ones")
        limit: PositiveInt | None = None
        path: str

    assert _options(DescribedConfig) == [
        "share: float = 0.5 (> 0, <= 1) -- share of rows kept",
        "names: list[str] = ['a'] -- which ones",
        "limit: int|None = None (> 0)",
        "path: str = required",
    ]
