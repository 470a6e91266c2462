"""Logging sinks: a run writes to TensorBoard, W&B (offline), MLflow (file store) and CSV, and each
library's own reader gives back what metrics.jsonl holds, one value per step after a resume.

One tiny run (5 steps, an evaluation at every step, samples from ``exact_match``) is
interrupted after step 4 (checkpoint at step 2, evaluation of step 3 done) and resumed, with
every sink on; the tests read its folder back.
"""

from __future__ import annotations

import csv
import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from aligntk import RecipeError, load_plugins, validate_recipe
from aligntk.testing import InterruptAt, read_metrics, run_recipe, write_tiny_assets

SINKS = ("tensorboard", "wandb", "mlflow", "csv")


def _recipe(folder: Path) -> dict[str, Any]:
    recipe = write_tiny_assets(folder, rows=16)
    recipe["train"].update(max_steps=5, log_every=1, eval_every=1, save_every=2)
    recipe["evaluators"] = [{"name": "exact_match", "max_new_tokens": 3, "limit": 4, "samples": 2}]
    recipe["plugins"] = {"sinks": {name: {"enabled": True} for name in SINKS}}
    return recipe


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("tensorboard", "wandb", "mlflow"):
        pytest.importorskip(module)
    recipe = _recipe(tmp_path_factory.mktemp("sinks"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGNTK_CACHE", str(tmp_path_factory.mktemp("cache")))  # as conftest does per test
        with pytest.raises(KeyboardInterrupt):
            run_recipe(recipe, plugins={"crash": InterruptAt(4)})
        run_recipe(recipe, resume=True)
    return Path(recipe["output_dir"])


def _by_step(records: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records}


# --------------------------------------------------------------------------------------
# TensorBoard: the reader TensorBoard itself serves data with
# --------------------------------------------------------------------------------------


def _tensorboard(run_dir: Path) -> Any:
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_are_the_metrics_once_per_step(run_dir: Path) -> None:
    from tensorboard.util.tensor_util import make_ndarray

    acc = _tensorboard(run_dir)
    for split, tag, key in (("train", "train/loss", "loss"), ("eval", "eval/eval_loss", "eval_loss")):
        events = acc.Tensors(tag)
        steps = [e.step for e in events]
        expected = _by_step(read_metrics(run_dir, split), key)
        assert steps == sorted(expected), f"{tag}: {steps}"  # steps 3 and 4 ran twice, kept once
        for e in events:
            assert float(make_ndarray(e.tensor_proto)) == pytest.approx(expected[e.step], rel=1e-6)


def test_tensorboard_has_the_recipe_and_the_samples(run_dir: Path) -> None:
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util.tensor_util import make_ndarray

    acc = _tensorboard(run_dir)
    start = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["train.max_steps"].number_value == 5
    assert hparams["loss.0.name"].string_value == "sft"
    assert "max_steps: 5" in make_ndarray(acc.Tensors("recipe/text_summary")[0].tensor_proto).item().decode()

    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    texts = acc.Tensors("samples/exact_match/text_summary")
    assert [e.step for e in texts] == [0, 1, 2, 3, 4, 5]
    last = make_ndarray(texts[-1].tensor_proto).item().decode()
    for s in (s for s in samples if s["step"] == 5):
        assert f"| {s['index']} | {s['prompt']} | {s['completion']} | {s['reference']} | {s['score']} |" in last


# --------------------------------------------------------------------------------------
# W&B: the offline transaction log, read record by record with wandb's own protobuf schema
# --------------------------------------------------------------------------------------


def _wandb_records(path: Path) -> list[Any]:
    """The records of a ``run-<id>.wandb`` file: a 7-byte ``:W&B`` header, then LevelDB log blocks."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, buf = [], header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        chunk, pos = data[pos + header : pos + header + length], pos + header + length
        if kind == 0:  # zero padding to the end of the block
            pos += block - pos % block if pos % block else 0
            continue
        buf = chunk if kind in (1, 2) else buf + chunk  # full, first / middle, last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def _wandb_history(run_dir: Path) -> tuple[list[str], list[dict[str, Any]], dict[str, Any]]:
    """Run ids, every history row (``{"_step": ..., key: value}``) and the config, over every offline run."""
    ids, rows, config = [], [], {}
    for folder in sorted((run_dir / "wandb").glob("*-run-*")):
        for record in _wandb_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.append(record.run.run_id)
                config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "history":
                rows.append({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in record.history.item})
    return ids, rows, config


def test_wandb_offline_run_has_the_metrics_once_per_step(run_dir: Path) -> None:
    folders = sorted(p.name for p in (run_dir / "wandb").glob("*-run-*"))
    assert len(folders) == 2 and all(f.startswith("offline-run-") for f in folders)  # never online by default
    ids, rows, config = _wandb_history(run_dir)
    assert len(set(ids)) == 1  # the resumed run continues the same W&B run
    assert config["train"]["max_steps"] == 5 and config["loss"][0]["name"] == "sft"
    for split, key in (("train", "loss"), ("eval", "eval_loss")):
        logged = [(r["_step"], r[f"{split}/{key}"]) for r in rows if f"{split}/{key}" in r]
        steps = [s for s, _ in logged]
        assert steps == sorted(set(steps)), f"{split}/{key}: {steps}"
        # An exact resume gives the interrupted run's values again: those steps are not sent twice.
        assert dict(logged) == _by_step(read_metrics(run_dir, split), key)


def test_wandb_tables_hold_the_samples(run_dir: Path) -> None:
    _, rows, _ = _wandb_history(run_dir)
    tables = {r["_step"]: r["samples/exact_match/path"] for r in rows if "samples/exact_match/path" in r}
    assert sorted(tables) == [0, 1, 2, 3, 4, 5]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    folders = list((run_dir / "wandb").glob("*-run-*/files"))
    for step, path in tables.items():
        table = json.loads(next(f / path for f in folders if (f / path).exists()).read_text())
        expected = [s for s in samples if s["step"] == step]
        assert table["columns"] == ["step", "index", "prompt", "completion", "reference", "score"]
        assert table["data"] == [[s[c] for c in table["columns"]] for s in expected]


# --------------------------------------------------------------------------------------
# MLflow: the tracking client on the run's file store
# --------------------------------------------------------------------------------------


def test_mlflow_run_has_the_metrics_params_and_samples(run_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("aligntk")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # resumed into the same MLflow run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    for split, key in (("train", "loss"), ("eval", "eval_loss")):
        history = client.get_metric_history(run.info.run_id, f"{split}/{key}")
        steps = [m.step for m in history]
        assert sorted(steps) == sorted(set(steps)), steps
        assert {m.step: m.value for m in history} == _by_step(read_metrics(run_dir, split), key)
    assert run.data.params["train.max_steps"] == "5" and run.data.params["loss.0.name"] == "sft"

    table = json.loads(Path(client.download_artifacts(run.info.run_id, "samples/exact_match.json")).read_text())
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert table["data"] == [[s[c] for c in table["columns"]] for s in samples]
    assert len(table["data"]) == 6 * 2  # 6 evaluations, 2 samples each


# --------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------


def test_csv_rows_are_the_metrics_once_per_step(run_dir: Path) -> None:
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    for split, key in (("train", "loss"), ("eval", "eval_loss")):
        mine = [(int(r["step"]), float(r[key])) for r in rows if r["split"] == split]
        assert [s for s, _ in mine] == sorted(_by_step(read_metrics(run_dir, split), key))
        assert dict(mine) == _by_step(read_metrics(run_dir, split), key)  # repr() of each float: exact
    assert all(r["eval_loss"] == "" for r in rows if r["split"] == "train")


def test_sink_files_are_the_runs_in_its_manifest(run_dir: Path) -> None:
    written = json.loads((run_dir / "aligntk-run.json").read_text())["written"]
    for name in ("tensorboard", "wandb", "mlruns", "metrics.csv", "sinks.json", "samples.jsonl"):
        assert name in written, name


# --------------------------------------------------------------------------------------
# Recipe mistakes: one line naming the key
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"wandb": {"enabled": True, "projct": "x"}}, "plugins.sinks.wandb.projct: unknown key, did you mean 'project'?"),
        ({"neptune": {"enabled": True}}, "plugins.sinks.neptune: unknown key (allowed: tensorboard, wandb, mlflow, csv)"),
        ({"wandb": {"mode": "onlin"}}, "plugins.sinks.wandb.mode: Input should be 'offline' or 'online', got 'onlin'"),
        ({"csv": {"enabled": "yes"}}, "plugins.sinks.csv.enabled: Input should be a valid boolean, got 'yes'"),
    ],
)
def test_bad_sink_option_is_one_line_naming_the_key(tmp_path: Path, section: dict, message: str) -> None:
    recipe = write_tiny_assets(tmp_path)
    recipe["plugins"] = {"sinks": section}
    with pytest.raises(RecipeError) as info:
        validate_recipe(recipe, load_plugins().registry)
    assert str(info.value) == message


def test_sink_without_its_library_names_the_key_and_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aligntk_sinks.base import require

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails, as if not installed
    recipe = write_tiny_assets(tmp_path)
    recipe["plugins"] = {"sinks": {"wandb": {"enabled": True}}}
    line = "plugins.sinks.wandb: the wandb sink needs the 'wandb' package: pip install 'aligntk[sinks]'"
    with pytest.raises(RecipeError) as info:
        validate_recipe(recipe, load_plugins().registry)
    assert str(info.value) == line
    with pytest.raises(RecipeError) as info:  # and at run start, should it vanish after validation
        require("wandb", "wandb")
    assert str(info.value) == line
    recipe["plugins"] = {"sinks": {"wandb": {"enabled": False}}}  # off: its library is not needed
    assert validate_recipe(recipe, load_plugins().registry).plugin_options["sinks"].wandb.enabled is False


def test_every_sink_is_off_by_default(tmp_path: Path) -> None:
    options = validate_recipe(write_tiny_assets(tmp_path), load_plugins().registry).plugin_options["sinks"]
    assert [getattr(options, name).enabled for name in SINKS] == [False] * 4
    assert options.wandb.mode == "offline"
