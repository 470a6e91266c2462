"""MLflow: one MLflow run per aligntk run, in a local file store by default.

Logged through ``MlflowClient`` (no global active run, so several runs in one process do not
mix): the flattened recipe as parameters and ``recipe.yaml`` as an artifact, metrics at the
optimizer step, samples as one table artifact per evaluator (``samples/<evaluator>.json``,
MLflow's ``{"columns", "data"}`` table format, every evaluation's rows). A resumed run logs
to the same MLflow run (its id is kept in the run folder's ``sinks.json``) and leaves out the
steps the interrupted run already logged.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from aligntk import RunInfo

from .base import SAMPLE_COLUMNS, flatten, require
from .options import MlflowOptions

#: The default store, inside the run folder.
FOLDER = "mlruns"
#: MLflow's limits: parameters per call, characters of a parameter value, metrics per call.
MAX_PARAMS, MAX_VALUE, MAX_METRICS = 100, 6000, 1000


def _key(name: str) -> str:
    """A metric or parameter name in the characters MLflow accepts."""
    return re.sub(r"[^\w\-. /:]", "_", name)


class MlflowSink:
    append_only = True

    def __init__(self, options: MlflowOptions, run: RunInfo, state: dict[str, Any]):
        uri = options.tracking_uri or (Path(run.run_dir) / FOLDER).resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses a file store unless asked; the local store is what this sink defaults to.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        require("mlflow", "mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        if run.start_step and state.get("run_id"):
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(options.experiment)
            experiment = found.experiment_id if found else self.client.create_experiment(options.experiment)
            created = self.client.create_run(experiment, run_name=options.run_name or Path(run.run_dir).name)
            self.run_id = created.info.run_id
            params = [Param(_key(k)[:250], str(v)[:MAX_VALUE]) for k, v in flatten(run.recipe).items()]
            for i in range(0, len(params), MAX_PARAMS):
                self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS])
            self.client.log_dict(self.run_id, run.recipe, "recipe.yaml")
        state["run_id"] = self.run_id

    def metrics(self, split: str, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        batch = [self.Metric(_key(f"{split}/{k}"), v, now, step) for k, v in values.items()]
        for i in range(0, len(batch), MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=batch[i : i + MAX_METRICS])

    def samples(self, step: int, evaluator: str, rows: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
        table = {"columns": list(SAMPLE_COLUMNS), "data": [[r.get(c) for c in SAMPLE_COLUMNS] for r in history]}
        self.client.log_dict(self.run_id, table, f"samples/{_key(evaluator)}.json")

    def close(self, error: BaseException | None) -> None:
        if error is None:
            status = "FINISHED"
        else:  # Ctrl-C and SIGTERM end a run that --resume continues
            status = "KILLED" if isinstance(error, KeyboardInterrupt) or "--resume" in str(error) else "FAILED"
        self.client.set_terminated(self.run_id, status=status)
