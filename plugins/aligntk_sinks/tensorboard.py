"""TensorBoard: scalars, the recipe as hyperparameters and text, samples as text tables.

Written with ``torch.utils.tensorboard.SummaryWriter`` (which needs the ``tensorboard``
package). Each writer starts a session (``purge_step``): a fresh run's at step 0, a resumed run's
at the first step it runs again, so TensorBoard drops what the interrupted run logged from
that step on and every step keeps one value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from aligntk import RunInfo

from .base import flatten, require
from .options import TensorBoardOptions

#: The default folder, inside the run folder.
FOLDER = "tensorboard"


def _cell(value: Any) -> str:
    """A value as one Markdown table cell."""
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


class TensorBoardSink:
    append_only = False

    def __init__(self, options: TensorBoardOptions, run: RunInfo):
        require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.log_dir = Path(options.log_dir or Path(run.run_dir) / FOLDER)
        # Every writer marks a session start: TensorBoard takes each start after the first as
        # a restart and drops what was logged from its step on (a resume runs those again).
        purge = run.start_step + 1 if run.start_step else 0
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge, flush_secs=options.flush_secs)
        if not run.start_step:
            # hparams() with no metric: the hyperparameters join this run's own event file.
            values = {k: ("null" if v is None else v) for k, v in flatten(run.recipe).items()}
            for summary in hparams(values, {}):
                self.writer.file_writer.add_summary(summary)
            recipe = yaml.safe_dump(run.recipe, sort_keys=False)
            self.writer.add_text("recipe", "```yaml\n" + recipe + "```", 0)

    def metrics(self, split: str, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{split}/{key}", value, step)
        if split == "eval":
            self.writer.flush()

    def samples(self, step: int, evaluator: str, rows: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
        columns = ("index", "prompt", "completion", "reference", "score")
        self.writer.add_text(f"samples/{evaluator}", markdown_table(rows, columns), step)

    def close(self, error: BaseException | None) -> None:
        self.writer.close()
