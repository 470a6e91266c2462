"""The lifecycle side: keep a window of step metrics per run, apply the rules, report each finding once."""

from __future__ import annotations

import json
import logging
from collections import deque
from pathlib import Path
from typing import Any

from aligntk import RunInfo, TrainingError

from . import rules
from .rules import DiagnosticsConfig, Finding

log = logging.getLogger("aligntk")

#: The recipe key this plugin reads: ``plugins: {diagnostics: {...}}``.
SECTION = "diagnostics"
FILE = "diagnostics.jsonl"


class Watcher:
    """One run's diagnostics: the recent history and the findings already reported."""

    def __init__(self, run: RunInfo, config: DiagnosticsConfig):
        self.run = run
        self.config = config
        self.history: deque[dict[str, float]] = deque(maxlen=max(config.window, config.vanishing_steps) + 1)
        self.reported: set[str] = set()
        self.findings: list[Finding] = []
        self.path = Path(run.run_dir) / FILE
        if run.start_step == 0 and self.path.exists():
            self.path.unlink()  # a fresh run (or --overwrite): earlier findings are not this run's

    def start(self) -> None:
        self.report(rules.no_trainable_parameters(self.run.trainable_parameters, self.run.total_parameters))

    def step(self, step: int, metrics: dict[str, float]) -> str | None:
        self.history.append({"step": step, **{k: float(metrics[k]) for k in ("loss", "lr", "grad_norm")}})
        history, c = list(self.history), self.config
        found = [
            rules.stalled_learning_rate(history, c),
            rules.vanishing_gradient(history, c),
            rules.exploding_gradient(history, c),
            rules.schedule_ends_early(history, self.run.max_steps),
        ]
        stops = [f.message for f in found if self.report(f) and f.kind in c.stop_on]
        return f"diagnostics: {stops[0]}" if stops else None

    def end(self, error: BaseException | None) -> None:
        if isinstance(error, TrainingError) and "not finite" in str(error):
            self.report(rules.loss_not_finite(list(self.history), error))

    def report(self, finding: Finding | None) -> bool:
        """Print and record a finding the first time its kind appears; return whether it was new."""
        if finding is None or finding.kind in self.reported:
            return False
        self.reported.add(finding.kind)
        self.findings.append(finding)
        log.warning("diagnostics: %s", finding.message)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": finding.step, "kind": finding.kind, "message": finding.message, "signals": finding.signals}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
        return True
