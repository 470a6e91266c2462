"""Logging sinks: TensorBoard, Weights & Biases (offline), MLflow (local store) and CSV, off by default.

A lifecycle plugin (entry point ``sinks = "aligntk_sinks"``). The recipe turns sinks on one
by one under ``plugins: {sinks: {tensorboard: {enabled: true}, wandb: {...}, mlflow: {...},
csv: {...}}}`` (options in ``options``; docs/logging.md shows how to view each). Each logged
step and each evaluation goes to every sink that is on; after an evaluation, the samples the
evaluators showed (the engine's ``samples.jsonl``) go to the sinks too. A sink's library is
imported only when that sink is on. Lifecycle hooks run on the main process only, so only
rank 0 writes.

On resume, TensorBoard (``purge_step``) and CSV (rows past the checkpoint dropped) end with
one value per step; W&B and MLflow, which cannot take a point back, continue the same run
(ids kept in ``<output_dir>/sinks.json``) and leave out the steps already sent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from aligntk import RegisterOptions, RunInfo, hookimpl

from .base import Sink, numbers, read_samples
from .options import SECTION, CsvOptions, MlflowOptions, SinksOptions, TensorBoardOptions, WandbOptions

__all__ = ["STATE_FILE", "CsvOptions", "MlflowOptions", "SinksOptions", "TensorBoardOptions", "WandbOptions"]

#: What sinks must remember across a resume: run ids, and the last step each sent per split.
STATE_FILE = "sinks.json"


class RunSinks:
    """The sinks that are on for one run, and their resume state."""

    def __init__(self, run: RunInfo, options: SinksOptions):
        self.run_dir = Path(run.run_dir)
        self.state_path = self.run_dir / STATE_FILE
        state: dict[str, Any] = {}
        if run.start_step and self.state_path.exists():
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        self.state: dict[str, dict[str, Any]] = {}
        self.sinks: dict[str, Sink] = {}
        try:
            for name in ("tensorboard", "wandb", "mlflow", "csv"):
                if getattr(options, name).enabled:
                    self.state[name] = dict(state.get(name) or {})
                    self.sinks[name] = self._open(name, getattr(options, name), run, self.state[name])
        except BaseException:
            self.close(None)
            raise
        self._save()

    @staticmethod
    def _open(name: str, options: Any, run: RunInfo, state: dict[str, Any]) -> Sink:
        # Each library is imported only here, when its sink is on.
        if name == "tensorboard":
            from .tensorboard import TensorBoardSink

            return TensorBoardSink(options, run)
        if name == "wandb":
            from .wandb_sink import WandbSink

            return WandbSink(options, run, state)
        if name == "mlflow":
            from .mlflow_sink import MlflowSink

            return MlflowSink(options, run, state)
        from .csv_sink import CsvSink

        return CsvSink(options, run)

    def _fresh(self, name: str, split: str, step: int) -> bool:
        """Whether ``step`` of ``split`` is new to sink ``name`` (an append-only one may have it already)."""
        if not self.sinks[name].append_only:
            return True  # it rewrites its own files on resume
        sent = self.state[name].setdefault("sent", {})
        if step <= sent.get(split, -1):
            return False
        sent[split] = step
        return True

    def metrics(self, split: str, step: int, metrics: dict[str, Any]) -> None:
        values = numbers(metrics)
        for name, sink in self.sinks.items():
            if self._fresh(name, split, step):
                sink.metrics(split, step, values)
        self._save()

    def samples(self, step: int) -> None:
        history = read_samples(self.run_dir)
        if not history or not self.sinks:
            return
        by_evaluator: dict[str, list[dict[str, Any]]] = {}
        for record in history:
            by_evaluator.setdefault(str(record.get("evaluator")), []).append(record)
        for name, sink in self.sinks.items():
            if not self._fresh(name, "samples", step):
                continue
            for evaluator, records in by_evaluator.items():
                rows = [r for r in records if r.get("step") == step]
                if rows:
                    sink.samples(step, evaluator, rows, records)
        self._save()

    def close(self, error: BaseException | None) -> None:
        failures = []
        for sink in self.sinks.values():
            try:
                sink.close(error)
            except Exception as exc:  # close the others; report the first after
                failures.append(exc)
        self.sinks = {}
        if failures and error is None:
            raise failures[0]

    def _save(self) -> None:
        kept = {name: self.state[name] for name, sink in self.sinks.items() if sink.append_only}
        if not kept:
            return
        tmp = self.state_path.with_name(f".{STATE_FILE}.tmp")
        tmp.write_text(json.dumps(kept, indent=1), encoding="utf-8")
        os.replace(tmp, self.state_path)


# One set of sinks per running run folder: several runs may share a process (weak-to-strong).
_runs: dict[Path, RunSinks] = {}


@hookimpl
def aligntk_register_options(register: RegisterOptions) -> None:
    register(SinksOptions)


@hookimpl
def aligntk_on_run_start(run: RunInfo) -> None:
    options = run.plugin_options.get(SECTION) or SinksOptions()
    sinks = RunSinks(run, options)
    if sinks.sinks:
        _runs[Path(run.run_dir)] = sinks


@hookimpl
def aligntk_on_step_end(run: RunInfo, step: int, metrics: dict[str, float]) -> None:
    sinks = _runs.get(Path(run.run_dir))
    if sinks is not None:
        sinks.metrics("train", step, metrics)


@hookimpl
def aligntk_on_eval_end(run: RunInfo, step: int, metrics: dict[str, float]) -> None:
    sinks = _runs.get(Path(run.run_dir))
    if sinks is not None:
        sinks.metrics("eval", step, metrics)
        sinks.samples(step)


@hookimpl
def aligntk_on_run_end(run: RunInfo, metrics: dict[str, Any], error: BaseException | None) -> None:
    sinks = _runs.pop(Path(run.run_dir), None)
    if sinks is not None:
        sinks.close(error)
