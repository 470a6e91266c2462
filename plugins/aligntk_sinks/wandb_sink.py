"""Weights & Biases: one W&B run per aligntk run, offline unless the recipe says ``mode: online``.

The recipe is the run's config; metrics are logged at the optimizer step (``step=``), samples
as a ``wandb.Table`` per evaluator and evaluation. Offline runs live in
``<dir>/wandb/offline-run-*`` until ``wandb sync`` uploads them. A resumed run continues
the same W&B run id (kept in the run folder's ``sinks.json``) and leaves out the steps the
interrupted run already logged, which an exact resume would only repeat.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aligntk import RunInfo

from .base import SAMPLE_COLUMNS, require
from .options import WandbOptions


class WandbSink:
    append_only = True

    def __init__(self, options: WandbOptions, run: RunInfo, state: dict[str, Any]):
        wandb = require("wandb", "wandb")
        self.wandb = wandb
        folder = Path(options.dir or run.run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        resuming = bool(run.start_step and state.get("run_id"))
        quiet = {"console": "off", "silent": True, "save_code": False}
        try:  # no system-metrics sampler: it would compete with training for the CPU
            settings = wandb.Settings(**quiet, x_disable_stats=True)
        except (TypeError, ValueError):  # a wandb without that setting
            settings = wandb.Settings(**quiet)
        self.run = wandb.init(
            project=options.project,
            entity=options.entity,
            group=options.group,
            name=options.name or Path(run.run_dir).name,
            tags=options.tags or None,
            dir=str(folder),
            mode=options.mode,
            config=run.recipe,
            id=state["run_id"] if resuming else None,
            resume="allow" if resuming else None,
            reinit="create_new",  # several aligntk runs in one process (weak-to-strong) get a run each
            settings=settings,
        )
        state["run_id"] = self.run.id
        self.dir = Path(self.run.dir).parent  # <dir>/wandb/<offline-run-...>

    def metrics(self, split: str, step: int, values: dict[str, float]) -> None:
        self.run.log({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def samples(self, step: int, evaluator: str, rows: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
        table = self.wandb.Table(columns=list(SAMPLE_COLUMNS), data=[[r.get(c) for c in SAMPLE_COLUMNS] for r in rows])
        self.run.log({f"samples/{evaluator}": table}, step=step)

    def close(self, error: BaseException | None) -> None:
        self.run.finish(exit_code=0 if error is None else 1)
