"""aligntk.checkpoint on its own: round trip, keep-N, the manifest, damaged checkpoints, finite weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from aligntk import AligntkError, TrainingError
from aligntk import checkpoint as ckpt
from aligntk.testing import char_tokenizer, tiny_batch, tiny_model

SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 2}
FILES = {"model.safetensors", "state.pt", "trainer_state.json"}


def _setup(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    model = tiny_model(char_tokenizer(), seed=seed, **SMALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, optimizer, scheduler


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    batch = tiny_batch(char_tokenizer())
    model(**batch).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _save(run_dir: Path, step: int, keep: int = 3, scaler: torch.amp.GradScaler | None = None) -> Path:
    model, optimizer, scheduler = _setup()
    return ckpt.save_checkpoint(run_dir, step, model, optimizer, scheduler, scaler, keep=keep, trainer_state={})


def test_round_trip_restores_weights_optimizer_scheduler_scaler_and_rng(tmp_path: Path) -> None:
    model, optimizer, scheduler = _setup()
    for _ in range(2):
        _step(model, optimizer, scheduler)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    torch.manual_seed(5)
    path = ckpt.save_checkpoint(
        tmp_path, 2, model, optimizer, scheduler, scaler, keep=3, trainer_state={"tokens_seen": 7},
        data_state={"block": [1, 2]},
    )
    assert path == tmp_path / "checkpoints" / "step-00000002"
    assert {p.name for p in path.iterdir()} == FILES | {"manifest.json"}
    next_draw = torch.rand(4)

    other, other_optimizer, other_scheduler = _setup(seed=1)  # other weights, fresh optimizer state
    other_scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    torch.manual_seed(99)
    state = ckpt.load_checkpoint(path, other, other_optimizer, other_scheduler, other_scaler)

    assert state == {"tokens_seen": 7, "step": 2, "data": {"block": [1, 2]}}
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    saved, loaded = optimizer.state_dict(), other_optimizer.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    for i, moments in saved["state"].items():
        assert set(loaded["state"][i]) == set(moments) == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(loaded["state"][i][k], v) for k, v in moments.items())
    assert other_scheduler.state_dict() == scheduler.state_dict()
    assert other_scheduler.get_last_lr() == scheduler.get_last_lr() == [1e-2 * 0.25]
    assert other_scaler.get_scale() == 1024.0
    assert torch.equal(torch.rand(4), next_draw)  # the random stream goes on where it was saved
    # Exact resume: one more step from each gives the same weights.
    _step(model, optimizer, scheduler)
    _step(other, other_optimizer, other_scheduler)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_another_model_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    bigger = tiny_model(char_tokenizer(), **{**SMALL, "num_hidden_layers": 2})
    optimizer = torch.optim.AdamW(bigger.parameters())
    with pytest.raises(AligntkError) as info:
        ckpt.load_checkpoint(path, bigger, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1), None)
    weights = path / "model.safetensors"
    assert str(info.value).startswith(f"{weights}: does not fit this run's model (missing ['model.layers.1")


def test_keeps_the_newest_n_and_leaves_no_temporary_folder(tmp_path: Path) -> None:
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    assert sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir()) == ["step-00000004", "step-00000005"]
    assert ckpt.list_checkpoints(tmp_path / "nowhere") == []


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    _save(tmp_path, 3)
    (ckpt.checkpoint_dir(tmp_path) / "step-00000003" / "stale.txt").write_text("from the first save")
    path = _save(tmp_path, 3)
    assert {p.name for p in path.iterdir()} == FILES | {"manifest.json"}
    assert ckpt.verify(path) is None


def test_the_manifest_records_every_file_and_verify_finds_each_kind_of_damage(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert set(manifest) == FILES
    assert all(entry["size"] == (path / name).stat().st_size for name, entry in manifest.items())
    assert all(len(entry["sha256"]) == 64 for entry in manifest.values())
    assert ckpt.verify(path) is None

    state = path / "state.pt"
    data = state.read_bytes()
    state.write_bytes(data[:-10])
    assert ckpt.verify(path) == f"{state} has {len(data) - 10} bytes, the manifest says {len(data)}"
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(flipped))
    assert ckpt.verify(path) == f"{state} does not match its sha256 in the manifest"
    state.unlink()
    assert ckpt.verify(path) == f"{state} is missing"
    (path / "manifest.json").write_text("{not json")
    assert ckpt.verify(path) == f"{path / 'manifest.json'} is not a readable manifest"
    (path / "manifest.json").unlink()
    assert ckpt.verify(path) is None  # an older checkpoint without a manifest is taken as it is


def test_latest_checkpoint_and_load_latest_pass_over_a_damaged_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good, newest = _save(tmp_path, 3), _save(tmp_path, 6)
    assert ckpt.latest_checkpoint(tmp_path) == newest
    weights = newest / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:100])
    assert ckpt.latest_checkpoint(tmp_path) == good

    model, optimizer, scheduler = _setup()
    with caplog.at_level(logging.WARNING, logger="aligntk"):
        path, state = ckpt.load_latest([newest, good], model, optimizer, scheduler, None)
    assert (path, state["step"]) == (good, 3)
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping damaged checkpoint: {weights} has 100 bytes, the manifest says {size}"
    ]

    (good / "trainer_state.json").unlink()
    assert ckpt.latest_checkpoint(tmp_path) is None
    with pytest.raises(AligntkError) as info:
        ckpt.load_latest([newest, good], model, optimizer, scheduler, None)
    assert str(info.value) == (
        "--resume: no checkpoint could be loaded (2 damaged): "
        f"newest: {weights} has 100 bytes, the manifest says {size}"
    )


def test_require_finite_names_the_bad_tensors_and_nothing_is_written(tmp_path: Path) -> None:
    model, optimizer, scheduler = _setup()
    assert ckpt.nonfinite_parameters(model) == []
    ckpt.require_finite(model, "the final model")  # all finite: no error
    previous = ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, None, keep=3, trainer_state={})
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
        model.model.norm.weight[0] = float("inf")
    assert ckpt.nonfinite_parameters(model) == ["model.norm.weight", "lm_head.weight"]
    with pytest.raises(TrainingError) as info:
        ckpt.require_finite(model, "the final model")
    assert str(info.value) == (
        "not writing the final model: 2 weight tensor(s) are not finite (model.norm.weight, lm_head.weight)"
    )
    with pytest.raises(TrainingError, match=r"^not writing the checkpoint for step 2: 2 weight tensor"):
        ckpt.save_checkpoint(tmp_path, 2, model, optimizer, scheduler, None, keep=3, trainer_state={})
    assert ckpt.list_checkpoints(tmp_path) == [previous]
    assert [p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir()] == ["step-00000001"]
