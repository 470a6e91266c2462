"""Diagnostics: notice a run that stalls or diverges and say why, in plain words; measure forgetting.

A lifecycle plugin. It keeps a window of the logged step metrics (``loss``, ``lr``,
``grad_norm``) and applies the rules in ``rules``; each finding is printed once as a
warning and appended to ``diagnostics.jsonl`` in the run folder. Options come from the
recipe's ``plugins: {diagnostics: {...}}``, validated with the recipe (``enabled: false``
turns it off, as for any lifecycle plugin). It also
registers two evaluators: ``perplexity`` on general text and parameter ``drift``.

Register the module itself as the plugin (entry point ``diagnostics = "aligntk_diagnostics"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aligntk import Register, RegisterOptions, RunInfo, hookimpl

from .forgetting import GeneralPerplexity, ParameterDrift
from .rules import DiagnosticsConfig, Finding
from .watcher import FILE, SECTION, Watcher

__all__ = ["FILE", "DiagnosticsConfig", "Finding", "GeneralPerplexity", "ParameterDrift", "Watcher"]

# One watcher per running run folder: several runs may share a process (weak-to-strong).
_watchers: dict[Path, Watcher] = {}


@hookimpl
def aligntk_register_evaluators(register: Register) -> None:
    register("perplexity", GeneralPerplexity)
    register("drift", ParameterDrift)


@hookimpl
def aligntk_register_options(register: RegisterOptions) -> None:
    register(DiagnosticsConfig)


@hookimpl
def aligntk_on_run_start(run: RunInfo) -> None:
    config = run.plugin_options.get(SECTION) or DiagnosticsConfig()
    watcher = Watcher(run, config)
    _watchers[Path(run.run_dir)] = watcher
    watcher.start()


@hookimpl
def aligntk_on_step_end(run: RunInfo, step: int, metrics: dict[str, float]) -> str | None:
    watcher = _watchers.get(Path(run.run_dir))
    return watcher.step(step, metrics) if watcher is not None else None


@hookimpl
def aligntk_on_run_end(run: RunInfo, metrics: dict[str, Any], error: BaseException | None) -> None:
    watcher = _watchers.pop(Path(run.run_dir), None)
    if watcher is not None:
        watcher.end(error)
