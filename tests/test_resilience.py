"""Nothing lost, nothing silent: SIGKILL and SIGTERM, damaged checkpoints, non-finite updates, --overwrite."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_same_weights
from safetensors.torch import load_file

from aligntk import AligntkError, LossCapabilities, LossOutput, TrainingError, hookimpl
from aligntk import checkpoint as ckpt
from aligntk.recipe import apply_override
from aligntk.testing import InterruptAt, char_tokenizer, read_metrics, run_recipe, tiny_model, write_tiny_assets

DRIVER = Path(__file__).parent / "crash_driver.py"
#: 9 steps, a checkpoint every 3, an evaluation every 4, accumulation, warm-up: every moment has something to lose.
COMMON = [
    "train.max_steps=9",
    "train.save_every=3",
    "train.keep_checkpoints=3",
    "train.eval_every=4",
    "train.grad_accum=2",
    "update.warmup_steps=2",
]


def _recipe(base: dict[str, Any], out: Path, overrides: list[str] = COMMON) -> dict[str, Any]:
    raw = copy.deepcopy(base)
    for override in overrides:
        apply_override(raw, override)
    raw["output_dir"] = str(out)
    return raw


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return write_tiny_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def reference(assets: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted one must end equal to."""
    return run_recipe(_recipe(assets, tmp_path_factory.mktemp("ref") / "run")).run_dir


def _driver(recipe: dict[str, Any], moment: str, nth: int) -> subprocess.Popen[str]:
    path = Path(recipe["output_dir"]).parent / f"{moment}-recipe.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, str(DRIVER), str(path), moment, str(nth)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


# -- SIGKILL at every moment, then --resume ---------------------------------------------

MOMENTS = [
    ("step", 5),  # gradients of step 5 computed, the update not applied
    ("weights", 2),  # the step-6 checkpoint: weights written, optimizer state not yet
    ("torn", 2),  # the step-6 checkpoint: half its weights file written
    ("manifest", 2),  # the step-6 checkpoint: complete but not renamed into place
    ("rotated", 2),  # just after the step-6 checkpoint, before step 7
    ("metrics", 7),  # half the step-5 record in metrics.jsonl
    ("eval", 2),  # inside the evaluation at step 4
    ("final", 1),  # the final model written under its temporary name, not renamed
]


@pytest.mark.parametrize(("moment", "nth"), MOMENTS, ids=[m for m, _ in MOMENTS])
def test_sigkill_then_resume_ends_with_the_same_weights(
    moment: str, nth: int, assets: dict[str, Any], reference: Path, tmp_path: Path
) -> None:
    recipe = _recipe(assets, tmp_path / "run")
    proc = _driver(recipe, moment, nth)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert not (tmp_path / "run" / "model").exists()

    resumed = run_recipe(recipe, resume=True)
    assert resumed.steps == 9
    assert_same_weights(reference, resumed.run_dir)
    # Every step is recorded once, every line is whole JSON, no temporary folder is left.
    assert [r["step"] for r in read_metrics(resumed.run_dir)] == list(range(1, 10))
    assert [r["loss"] for r in read_metrics(resumed.run_dir)] == [r["loss"] for r in read_metrics(reference)]
    assert not [p for p in (resumed.run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert not (resumed.run_dir / ".tmp-model").exists()


# -- SIGTERM: a checkpoint at the step reached, a distinct exit status ----------------------


def test_sigterm_writes_a_checkpoint_at_the_step_reached_and_resumes_exactly(
    assets: dict[str, Any], reference: Path, tmp_path: Path
) -> None:
    recipe = _recipe(assets, tmp_path / "run")
    proc = _driver(recipe, "slow", 0)  # a real signal from outside, mid-run
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any('"split": "train", "step": 2' in line for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "Traceback" not in err
    found = re.search(r"stopped by SIGTERM after step (\d) of 9; checkpoint (\S+): continue with --resume", err)
    assert found, err[-2000:]
    step = int(found.group(1))
    assert 2 <= step < 9
    path = Path(found.group(2))
    assert path == tmp_path / "run" / "checkpoints" / f"step-{step:08d}"
    assert json.loads((path / "trainer_state.json").read_text())["step"] == step
    assert ckpt.verify(path) is None
    assert read_metrics(tmp_path / "run")[-1]["step"] == step

    resumed = run_recipe(recipe, resume=True)
    assert_same_weights(reference, resumed.run_dir)


# -- damaged checkpoints ----------------------------------------------------------------


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated state.pt": ("state.pt", _truncate),
    "a flipped byte in the weights": ("model.safetensors", _flip_a_byte),
    "a missing trainer_state.json": ("trainer_state.json", Path.unlink),
    "a truncated manifest": ("manifest.json", _truncate),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_is_passed_over_for_the_newest_good_one(
    damage: str, assets: dict[str, Any], reference: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = _recipe(assets, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, plugins={"crash": InterruptAt(8)})
    name, spoil = DAMAGE[damage]
    newest = tmp_path / "run" / "checkpoints" / "step-00000006"
    spoil(newest / name)
    assert ckpt.latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "step-00000003"
    with caplog.at_level(logging.WARNING, logger="aligntk"):
        resumed = run_recipe(recipe, resume=True)
    warned = [r.getMessage() for r in caplog.records if "skipping damaged checkpoint" in r.getMessage()]
    assert len(warned) == 1 and str(newest) in warned[0] and "\n" not in warned[0]
    assert_same_weights(reference, resumed.run_dir)


def test_a_checkpoint_without_a_manifest_is_still_loaded_and_a_corrupt_one_passed_over(
    assets: dict[str, Any], reference: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Checkpoints written before manifests existed have none: they load if they can.
    recipe = _recipe(assets, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, plugins={"crash": InterruptAt(8)})
    root = tmp_path / "run" / "checkpoints"
    for folder in root.iterdir():
        (folder / "manifest.json").unlink()
    _truncate(root / "step-00000006" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="aligntk"):
        resumed = run_recipe(recipe, resume=True)
    assert any("step-00000006/model.safetensors: cannot be read" in r.getMessage() for r in caplog.records)
    assert_same_weights(reference, resumed.run_dir)


def test_when_every_checkpoint_is_damaged_resume_fails_in_one_line(assets: dict[str, Any], tmp_path: Path) -> None:
    recipe = _recipe(assets, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, plugins={"crash": InterruptAt(7)})
    for folder in (tmp_path / "run" / "checkpoints").iterdir():
        _truncate(folder / "state.pt")
    with pytest.raises(AligntkError, match=r"--resume: no checkpoint could be loaded \(2 damaged\): newest: .*step-00000006/state.pt") as exc:
        run_recipe(recipe, resume=True)
    assert "\n" not in str(exc.value) and "weights_only" not in str(exc.value)


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from aligntk.rundir import drop_metrics_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"split": "train", "step": 1}\n{"split": "train", "step": 2}\n{"split": "train", "st')
    with caplog.at_level(logging.WARNING, logger="aligntk"):
        drop_metrics_after(path, 1)
    assert path.read_text() == '{"split": "train", "step": 1}\n'
    assert any(f"{path}:3: dropped a line" in r.getMessage() for r in caplog.records)


def test_checkpoint_files_are_in_the_manifest_with_their_sizes_and_hashes(assets: dict[str, Any], tmp_path: Path) -> None:
    run = run_recipe(_recipe(assets, tmp_path / "run", ["train.max_steps=3", "train.save_every=3"]))
    folder = run.run_dir / "checkpoints" / "step-00000003"
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert sorted(files) == ["model.safetensors", "state.pt", "trainer_state.json"]
    assert files["state.pt"]["size"] == (folder / "state.pt").stat().st_size
    assert ckpt.verify(folder) is None
    (folder / "trainer_state.json").write_text('{"step": 4}')
    assert "trainer_state.json has 11 bytes" in (ckpt.verify(folder) or "") or "sha256" in (ckpt.verify(folder) or "")


# -- non-finite updates -------------------------------------------------------------------


class NaNAt:
    """Registers ``nan_at``: the SFT loss, NaN on the optimizer steps listed in ``steps``."""

    def __init__(self, steps: set[int], scale: float = float("nan")):
        from aligntk_sft import SFTLoss

        plugin = self

        class NaNLoss(SFTLoss):
            @classmethod
            def capabilities(cls, config: Any) -> LossCapabilities:
                return LossCapabilities(scheduled=True)

            def start_step(self, step: int, max_steps: int) -> None:
                plugin.step = step

            def __call__(self, models: Any, batch: dict) -> LossOutput:
                out = super().__call__(models, batch)
                if self.training_step_is_bad():
                    out.sum = out.sum * plugin.scale
                return out

            def training_step_is_bad(self) -> bool:
                return torch.is_grad_enabled() and plugin.step in plugin.steps

        self.steps, self.scale, self.step, self.cls = steps, scale, 0, NaNLoss

    @hookimpl
    def aligntk_register_losses(self, register: Any) -> None:
        register("nan_at", self.cls)


def _nan_recipe(assets: dict[str, Any], out: Path, *extra: str) -> dict[str, Any]:
    recipe = _recipe(assets, out, ["train.max_steps=6", "train.save_every=1", "train.keep_checkpoints=10", *extra])
    recipe["loss"] = {"name": "nan_at"}
    return recipe


def test_a_huge_learning_rate_stops_before_a_nan_update_and_writes_nothing_non_finite(tmp_path: Path) -> None:
    # The report that started this: the quickstart at learning rate 1e6 put a NaN update in and exited 0.
    from click.testing import CliRunner

    from aligntk.cli import main

    out = tmp_path / "run"
    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    args = ["run", str(quickstart), f"output_dir={out}", "update.learning_rate=1.0e6", "train.max_steps=12",
            "train.save_every=1", "train.keep_checkpoints=20", "train.eval_every=null", "evaluators=[]",
            "train.log_every=1", "data.eval_path=null"]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 1, done.output
    assert "Traceback" not in done.output
    line = [x for x in done.output.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and re.match(r"error: step \d+: the (loss|gradient norm) is (nan|inf) \(not finite\)", line[0])
    assert not (out / "model").exists()
    checkpoints = ckpt.list_checkpoints(out)
    assert checkpoints
    for folder in checkpoints:
        assert all(torch.isfinite(t).all() for t in load_file(str(folder / "model.safetensors")).values())
    named = re.search(r"the last good checkpoint is (\S+)\.", line[0])
    assert named and Path(named.group(1)) == checkpoints[-1]
    assert ckpt.verify(checkpoints[-1]) is None


def test_skip_drops_exactly_that_update_and_goes_on(assets: dict[str, Any], tmp_path: Path) -> None:
    plugin = NaNAt({3})
    result = run_recipe(_nan_recipe(assets, tmp_path / "run", "train.on_nonfinite=skip"), plugins={"nan": plugin})
    assert result.steps == 6 and (result.run_dir / "model").is_dir()
    records = {r["step"]: r for r in read_metrics(result.run_dir)}
    assert records[3]["skipped"] == 1.0 and records[3]["skipped_steps"] == 1.0
    assert records[4]["skipped"] == 0.0 and records[4]["skipped_steps"] == 1.0
    assert "skipped" not in records[2]
    root = result.run_dir / "checkpoints"
    before, after = (load_file(str(root / f"step-0000000{s}" / "model.safetensors")) for s in (2, 3))
    assert all(torch.equal(before[k], after[k]) for k in before)  # step 3 changed nothing
    state2, state3 = (torch.load(root / f"step-0000000{s}" / "state.pt", weights_only=True) for s in (2, 3))
    assert state2["scheduler"]["last_epoch"] == state3["scheduler"]["last_epoch"]  # nor the schedule
    assert json.loads((root / "step-00000003" / "trainer_state.json").read_text())["skipped_steps"] == 1


def test_skip_stops_after_max_skipped_steps_in_a_row(assets: dict[str, Any], tmp_path: Path) -> None:
    recipe = _nan_recipe(assets, tmp_path / "run", "train.on_nonfinite=skip", "train.max_skipped_steps=3")
    with pytest.raises(TrainingError, match=r"step 5: 3 updates in a row were dropped \(the loss is nan\); stopped, "
                                            r"the last good checkpoint is .*step-00000004"):
        run_recipe(recipe, plugins={"nan": NaNAt({3, 4, 5, 6})})
    assert not (tmp_path / "run" / "model").exists()


def test_stop_is_the_default_and_exits_non_zero_through_the_cli(assets: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"step 3: the loss is nan \(not finite\); stopped before applying this update, "
                                            r"the last good checkpoint is .*step-00000002.*train.on_nonfinite: skip"):
        run_recipe(_nan_recipe(assets, tmp_path / "run"), plugins={"nan": NaNAt({3})})
    assert TrainingError("x").exit_code == 1


def test_fp16_overflow_is_counted_not_an_error_until_the_limit(assets: dict[str, Any], tmp_path: Path) -> None:
    # A loss of ~1e35 overflows float32 gradients once scaled by the gradient scaler's 65536.
    once = run_recipe(
        _nan_recipe(assets, tmp_path / "once", "train.precision=fp16"), plugins={"nan": NaNAt({2}, scale=1e35)}
    )
    records = {r["step"]: r for r in read_metrics(once.run_dir)}
    assert records[2]["skipped"] == 1.0 and records[6]["skipped_steps"] == 1.0
    state = torch.load(once.run_dir / "checkpoints" / "step-00000002" / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] == 32768.0  # the scaler halved its scale
    with pytest.raises(TrainingError, match=r"step 4: 3 updates in a row were dropped \(the gradient norm is (inf|nan)\)"):
        run_recipe(
            _nan_recipe(assets, tmp_path / "always", "train.precision=fp16", "train.max_skipped_steps=3"),
            plugins={"nan": NaNAt({2, 3, 4, 5, 6}, scale=1e35)},
        )


def test_a_model_with_a_nan_weight_is_never_written(tmp_path: Path) -> None:
    model = tiny_model(char_tokenizer())
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(TrainingError, match=r"not writing the checkpoint for step 1: 1 weight tensor\(s\) are not finite "
                                            r"\(model.layers.1.mlp.up_proj.weight\)"):
        ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, None, keep=2, trainer_state={})
    assert not (tmp_path / "checkpoints" / "step-00000001").exists()


# -- --overwrite deletes only what a run wrote ----------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_a_folder_of_the_users_own_files(assets: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "mine"
    for name in ("model", "cache", "checkpoints"):
        (out / name).mkdir(parents=True)
        (out / name / "notes.txt").write_text(f"my {name}")
    before = _tree(out)
    with pytest.raises(AligntkError, match=r"mine: --overwrite refused: the folder is not an aligntk run \(no aligntk-run.json\)"):
        run_recipe(_recipe(assets, out, ["train.max_steps=1"]), overwrite=True)
    assert _tree(out) == before


def test_overwrite_refuses_files_the_run_did_not_write_and_a_swapped_symlink(assets: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = _recipe(assets, out, ["train.max_steps=1"])
    run_recipe(recipe)
    (out / "my-notes.txt").write_text("mine")
    with pytest.raises(AligntkError, match=r"--overwrite refused: my-notes.txt were not written by the run there"):
        run_recipe(recipe, overwrite=True)
    (out / "my-notes.txt").unlink()

    elsewhere = tmp_path / "earlier-model"
    (out / "model").rename(elsewhere)
    (out / "model").symlink_to(elsewhere, target_is_directory=True)
    before = _tree(elsewhere)
    with pytest.raises(AligntkError, match=r"model \(now a link, the run wrote a dir\) were not written by the run"):
        run_recipe(recipe, overwrite=True)
    assert _tree(elsewhere) == before  # the link's target is untouched


def test_overwrite_replaces_what_the_run_wrote_and_keeps_what_was_there_before(assets: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.txt").write_text("the user's, there before the run")
    recipe = _recipe(assets, out, ["train.max_steps=2", "train.save_every=1"])
    run_recipe(recipe)
    manifest = json.loads((out / "aligntk-run.json").read_text())
    assert manifest["kept"] == ["README.txt"]
    assert {"checkpoints", "metrics.jsonl", "model", "recipe.yaml", "diagnostics.jsonl"} - set(manifest["written"]) <= {"diagnostics.jsonl"}
    run_recipe(_recipe(assets, out, ["train.max_steps=1"]), overwrite=True)
    assert (out / "README.txt").read_text() == "the user's, there before the run"
    assert not (out / "checkpoints").exists()  # the first run's; the second saves none
    assert [r["step"] for r in read_metrics(out)] == [1]


def test_output_dir_expands_the_home_folder(assets: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = _recipe(assets, tmp_path / "unused", ["train.max_steps=1"])
    recipe["output_dir"] = "~/runs/home"
    result = run_recipe(recipe)
    assert (tmp_path / "runs" / "home" / "model").is_dir()
    assert not Path("~").exists()
    assert result.run_dir == tmp_path / "runs" / "home"
