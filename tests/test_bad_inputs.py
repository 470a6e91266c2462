"""Bad input through the command line, as a careful user would give it.

Every case runs ``aligntk run`` (or ``validate``) with ``--overwrite`` aimed at a folder
holding an earlier, finished run, and asserts four things: the exit status, one
``error:`` line that names the place (file, line, row or recipe key), no traceback, and
that every byte of the earlier run is still there.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from aligntk.cli import main
from aligntk.testing import InterruptAt, run_recipe, write_tiny_assets


@dataclass
class Ctx:
    """What a case may use: the tiny assets, the earlier run, and a scratch folder of its own."""

    recipe: dict[str, Any]
    earlier: Path
    scratch: Path
    assets: Path
    args: list[str] = field(default_factory=list)

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.scratch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def data(self, name: str, content: str | bytes) -> Path:
        path = self.file(name, content)
        self.recipe["data"]["path"] = str(path)
        return path


@dataclass
class Case:
    id: str
    expect: str  # a substring of the error line that names the place
    change: Callable[[Ctx], None] = lambda c: None
    overrides: tuple[str, ...] = ()
    flags: tuple[str, ...] = ("--overwrite",)
    command: str = "run"
    code: int = 1
    raw: str | bytes | None = None  # the recipe file's text, when the case is about the file itself


def _model_folder(c: Ctx) -> Path:
    """A copy of the earlier run's saved model, to spoil."""
    folder = c.scratch / "model"
    shutil.copytree(c.earlier / "model", folder)
    c.recipe["model"] = {"path": str(folder)}
    return folder


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _resumable(c: Ctx, stop_at: int = 3) -> Path:
    """A run in the scratch folder interrupted after ``stop_at`` steps, with checkpoints."""
    recipe = copy.deepcopy(c.recipe)
    recipe["output_dir"] = str(c.scratch / "resumable")
    recipe["train"].update(max_steps=6, save_every=1)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, plugins={"crash": InterruptAt(stop_at)})
    c.recipe = recipe
    return Path(recipe["output_dir"])


def _not_a_pickle(checkpoint: Path) -> None:
    """A state.pt that torch cannot read, in a checkpoint without a manifest (as older ones are)."""
    (checkpoint / "state.pt").write_bytes(b"\x80\x04not a pickle")
    (checkpoint / "manifest.json").unlink()


def _set(key: str, value: Any) -> Callable[[Ctx], None]:
    def change(c: Ctx) -> None:
        node = c.recipe
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return change


ROWS = '{"prompt": "1+2=", "completion": "3"}\n'

CASES = [
    # -- the recipe file ----------------------------------------------------------------
    Case("recipe-missing", "no-such.yaml: recipe file not found", lambda c: c.args.__setitem__(1, "no-such.yaml")),
    Case("recipe-not-yaml", "r.yaml:3:1: not valid YAML", raw="train:\n  max_steps: [1,\n"),
    Case("recipe-not-utf8", "r.yaml:1: not UTF-8", raw=b"seed: \xe9\n"),
    Case("recipe-a-list", "r.yaml: a recipe is a mapping of keys, got list", raw="- 1\n- 2\n"),
    Case("recipe-duplicate-key", "train.max_steps: duplicate key (first on line", raw="DUPLICATE"),
    # -- recipe keys --------------------------------------------------------------------
    Case("unknown-top-key", "outptu_dir: unknown key, did you mean 'output_dir'?", _set("outptu_dir", "x")),
    Case("unknown-train-key", "train.max_step: unknown key, did you mean 'max_steps'?", _set("train.max_step", 3)),
    Case("bool-for-int", "train.max_steps: expected an integer, got True", _set("train.max_steps", True)),
    Case("bool-for-float", "update.learning_rate: expected a number, got True", _set("update.learning_rate", True)),
    Case("negative-batch", "train.batch_size: Input should be greater than 0", _set("train.batch_size", -1)),
    Case("bad-precision", "train.precision: Input should be 'fp32', 'bf16' or 'fp16'", _set("train.precision", "fp8")),
    Case("bad-on-nonfinite", "train.on_nonfinite: Input should be 'stop' or 'skip'", _set("train.on_nonfinite", "ignore")),
    Case("unknown-data", "data.name: unknown data 'sftt', did you mean 'sft'?", _set("data.name", "sftt")),
    Case("unknown-loss", "loss.name: unknown loss 'sf', did you mean 'sft'?", _set("loss.name", "sf")),
    Case("unknown-update-option", "update.learning_rat: unknown key, did you mean 'learning_rate'?",
         _set("update.learning_rat", 1e-3)),
    Case("unknown-data-option", "data.max_lenght: unknown key, did you mean 'max_length'?", _set("data.max_lenght", 8)),
    Case("model-config-typo", "model.config.hiden_size: unknown key for a llama config, did you mean 'hidden_size'?",
         _set("model.config.hiden_size", 64)),
    Case("model-type-typo", "model.config.model_type: unknown model type 'lama', did you mean 'llama'?",
         _set("model.config.model_type", "lama")),
    Case("bad-architecture", "model.config: not a valid llama config", _set("model.config.num_attention_heads", 3)),
    Case("model-path-and-config", "model: give exactly one of 'path'",
         _set("model.path", "/somewhere")),
    Case("missing-frozen-role", "models.teacher: the loss needs a 'teacher' model", _set("loss", {"name": "token_distill"})),
    Case("loss-needs-fields", "loss 'dpo' needs batch fields", _set("loss", {"name": "dpo"})),
    Case("plugin-not-installed", "plugins.diagnostcs: no installed plugin is named 'diagnostcs', did you mean 'diagnostics'?",
         _set("plugins", {"diagnostcs": {}})),
    Case("plugin-option-typo", "plugins.diagnostics.windw: unknown key, did you mean 'window'?",
         _set("plugins", {"diagnostics": {"windw": 3}})),
    Case("plugin-enabled-not-bool", "plugins.console.enabled: expected true or false, got 'no'",
         _set("plugins", {"console": {"enabled": "no"}})),
    Case("plugin-without-options", "plugins.console.colour: unknown key (plugin 'console' takes no options",
         _set("plugins", {"console": {"colour": "red"}})),
    Case("broken-plugin-component", "loss.name: unknown loss 'broken_loss'", _set("loss.name", "broken_loss")),
    # -- overrides and flags -----------------------------------------------------------
    Case("override-without-equals", "override 'train.max_steps': expected key.path=value", overrides=("train.max_steps",)),
    Case("override-bad-yaml", "override 'train.max_steps=[1': the value is not valid YAML", overrides=("train.max_steps=[1",)),
    Case("override-list-index", "override loss.5: no list item 5", lambda c: c.recipe.update(loss=[c.recipe["loss"]]),
         overrides=("loss.5.weight=2",)),
    Case("override-into-scalar", "override seed.x: cannot set a key inside a int", overrides=("seed.x=1",)),
    Case("override-unknown-key", "train.max_stesp: unknown key, did you mean 'max_steps'?", overrides=("train.max_stesp=3",)),
    Case("resume-and-overwrite", "--resume and --overwrite contradict each other", flags=("--resume", "--overwrite")),
    # -- devices, folders, files the recipe names ---------------------------------------
    Case("no-cuda", "train.device: cuda was asked for but no CUDA device is available", _set("train.device", "cuda")),
    Case("validate-no-cuda", "train.device: cuda was asked for", _set("train.device", "cuda"), command="validate", flags=()),
    Case("tokenizer-folder-missing", "model.tokenizer: ", _set("model.tokenizer", "./no/such/tokenizer")),
    Case("validate-model-folder-missing", "model.path: ./no/such/model: no such model or tokenizer folder",
         _set("model", {"path": "./no/such/model"}), command="validate", flags=()),
    Case("corrupt-safetensors", "model.safetensors: corrupt or truncated safetensors file",
         lambda c: _truncate(_model_folder(c) / "model.safetensors")),
    Case("corrupt-config-json", "config.json", lambda c: (_model_folder(c) / "config.json").write_text("{not json")),
    Case("corrupt-tokenizer-json", "tokenizer.json:1:", lambda c: (_model_folder(c) / "tokenizer.json").write_text("[1, oops")),
    # -- data files and rows ------------------------------------------------------------
    Case("data-file-missing", "data.path: file not found", _set("data.path", "/no/such/train.jsonl")),
    Case("data-unknown-extension", "train.txt: unknown data file type '.txt'", lambda c: c.data("train.txt", ROWS)),
    Case("data-bad-json-line", "train.jsonl:2: not valid JSON", lambda c: c.data("train.jsonl", ROWS + "{oops\n")),
    Case("data-row-not-object", "train.jsonl:2: expected a JSON object, got list", lambda c: c.data("train.jsonl", ROWS + "[1]\n")),
    Case("data-row-missing-field", "train.jsonl:2:", lambda c: c.data("train.jsonl", ROWS + '{"prompt": "1+1="}\n')),
    Case("data-empty-file", "train.jsonl: the file has no rows", lambda c: c.data("train.jsonl", "")),
    Case("data-csv-cells", "train.csv:3: 3 cells, but the header has 2 columns",
         lambda c: c.data("train.csv", "prompt,completion\n1+2=,3\n1+1=,2,x\n")),
    Case("data-not-utf8", "train.jsonl: not UTF-8 text", lambda c: c.data("train.jsonl", b'{"prompt": "\xe9", "completion": "3"}\n')),
    Case("data-unknown-tokens", "above data.max_unk_fraction 0.05",
         lambda c: (c.data("train.jsonl", '{"prompt": "what is one plus two?", "completion": "three"}\n' * 4),
                    c.recipe["data"].update(max_unk_fraction=0.05))),
    Case("data-too-long", "longer than max_length 4",
         lambda c: c.recipe["data"].update(max_length=4, truncation="error")),
    # -- run folders and checkpoints ----------------------------------------------------
    Case("overwrite-users-folder", "--overwrite refused: the folder is not an aligntk run",
         lambda c: (c.file("mine/model/notes.txt", "mine"), c.recipe.update(output_dir=str(c.scratch / "mine")))),
    Case("output-dir-is-a-file", "output_dir: ", lambda c: c.recipe.update(output_dir=str(c.file("afile", "x")))),
    Case("resume-nothing", "--resume was given but there is no complete checkpoint",
         lambda c: c.recipe.update(output_dir=str(c.scratch / "fresh")), flags=("--resume",)),
    Case("resume-all-damaged", "--resume: no checkpoint could be loaded",
         lambda c: [_truncate(p / "state.pt") for p in (_resumable(c) / "checkpoints").iterdir()], flags=("--resume",)),
    Case("resume-changed-recipe", "--resume with a recipe that differs from the run's (train.batch_size)",
         lambda c: (_resumable(c), c.recipe["train"].update(batch_size=2)), flags=("--resume",)),
    Case("corrupt-state-pt", "state.pt: cannot be read (not a readable checkpoint state file)",
         lambda c: [_not_a_pickle(p) for p in (_resumable(c) / "checkpoints").iterdir()], flags=("--resume",)),
]


@pytest.fixture(scope="module")
def earlier(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The tiny assets and a finished run (with a checkpoint) that no bad input may touch."""
    assets = write_tiny_assets(tmp_path_factory.mktemp("assets"), rows=16)
    assets["train"].update(max_steps=2, save_every=2)
    run_recipe(assets)
    return assets, Path(assets["output_dir"])


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_recipe(case: Case, ctx: Ctx) -> Path:
    path = ctx.scratch / "r.yaml"
    if case.raw == "DUPLICATE":
        text = yaml.safe_dump(ctx.recipe, sort_keys=False)
        path.write_text(text.replace("train:\n", "train:\n  max_steps: 2\n", 1))
    elif isinstance(case.raw, bytes):
        path.write_bytes(case.raw)
    elif case.raw is not None:
        path.write_text(case.raw)
    else:
        path.write_text(yaml.safe_dump(ctx.recipe, sort_keys=False))
    return path


def test_there_are_at_least_forty_cases() -> None:
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_naming_the_place_and_loses_nothing(
    case: Case, earlier: tuple[dict[str, Any], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assets, run_dir = earlier
    before = _tree(run_dir)
    ctx = Ctx(recipe=copy.deepcopy(assets), earlier=run_dir, scratch=tmp_path, assets=run_dir.parent)
    ctx.args = [case.command, str(tmp_path / "r.yaml")]
    monkeypatch.chdir(tmp_path)  # relative paths in a case are relative to the scratch folder
    case.change(ctx)
    recipe_path = _write_recipe(case, ctx)
    if ctx.args[1] == str(tmp_path / "r.yaml"):
        ctx.args[1] = str(recipe_path)
    result = CliRunner().invoke(main, [*ctx.args, *case.overrides, *case.flags])

    assert isinstance(result.exception, SystemExit), f"not a clean exit: {result.exception!r}\n{result.output}"
    assert result.exit_code == case.code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert case.expect in errors[0], errors[0]
    assert "weights_only" not in result.output
    assert _tree(run_dir) == before  # the earlier run is intact, every byte
