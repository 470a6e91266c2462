"""Console output as a lifecycle plugin: a progress bar with loss, learning rate and tokens/s.

On a terminal it draws a live bar; elsewhere (CI logs, files) it prints about ten
progress lines per run. Evaluations are printed as they finish.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from aligntk import RunInfo, hookimpl


def _fmt(metrics: dict[str, Any], keys: list[str] | None = None) -> str:
    keys = keys or [k for k in metrics if k not in ("split", "step")]
    parts = []
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif value is not None:
            parts.append(f"{key} {value}")
    return "  ".join(parts)


class ConsoleReporter:
    """Holds the live progress bar between hook calls."""

    def __init__(self) -> None:
        self.console = Console(stderr=True, soft_wrap=True)
        self.progress: Progress | None = None
        self.task: Any = None
        self.every = 1

    @hookimpl
    def aligntk_on_run_start(self, run: RunInfo) -> None:
        c = self.console
        c.print(
            f"[bold]aligntk[/] {run.run_dir}  device {run.device}  processes {run.world_size}  "
            f"trainable {run.trainable_parameters:,} of {run.total_parameters:,} parameters"
        )
        self.every = max(1, run.max_steps // 10)
        if c.is_terminal:
            self.progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=c,
            )
            self.task = self.progress.add_task("train", total=run.max_steps, completed=run.start_step, status="")
            self.progress.start()

    @hookimpl
    def aligntk_on_step_end(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        status = _fmt(metrics, ["loss", "lr", "grad_norm", "tokens_per_s"])
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)
        elif step % self.every == 0 or step == run.max_steps:
            self.console.print(f"step {step}/{run.max_steps}  {status}")

    @hookimpl
    def aligntk_on_eval_end(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        label = "before training" if step == 0 else f"step {step}"
        self.console.print(f"[bold]eval[/] ({label})  {_fmt(metrics)}")

    @hookimpl
    def aligntk_on_checkpoint_saved(self, run: RunInfo, step: int, path: Any) -> None:
        if self.progress is None:
            self.console.print(f"checkpoint {path}")

    @hookimpl
    def aligntk_on_run_end(self, run: RunInfo, metrics: dict[str, Any], error: BaseException | None) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


reporter = ConsoleReporter()
