"""The recipe section ``plugins: {sinks: {...}}``: one switch and a few options per sink, all off by default.

Each sink's library is looked for (not imported) when the recipe is validated, so a sink
turned on without its library is a one-line error at ``aligntk validate`` time, naming the
recipe key and the extra to install. The library itself is imported when the run starts.
"""

from __future__ import annotations

import importlib.util
from typing import ClassVar, Literal

from pydantic import Field, PositiveInt, StrictBool, model_validator

from aligntk import ComponentConfig, LocalPath

#: The recipe key of this plugin's section: ``plugins: {sinks: {...}}`` (its entry-point name).
SECTION = "sinks"
INSTALL = "pip install 'aligntk[sinks]'"


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it (import blocked)
        return False


def missing_library(sink: str, module: str) -> str:
    """The one-line message for a sink turned on without its library."""
    return f"plugins.{SECTION}.{sink}: the {sink} sink needs the '{module}' package: {INSTALL}"


class _Sink(ComponentConfig):
    #: The sink's recipe key and the module it imports.
    key: ClassVar[str] = ""
    module: ClassVar[str] = ""

    enabled: StrictBool = False

    @model_validator(mode="after")
    def _library_installed(self) -> _Sink:
        if self.enabled and not installed(self.module):
            raise ValueError(f"the {self.key} sink needs the '{self.module}' package: {INSTALL}")
        return self


class TensorBoardOptions(_Sink):
    """``plugins.sinks.tensorboard``: event files for ``tensorboard --logdir``.

    Attributes:
        enabled: write event files.
        log_dir: where (default ``<output_dir>/tensorboard``); relative to the recipe's folder.
        flush_secs: how often buffered events reach the disk.
    """

    key = "tensorboard"
    module = "tensorboard"

    log_dir: LocalPath | None = None
    flush_secs: PositiveInt = 10


class WandbOptions(_Sink):
    """``plugins.sinks.wandb``: a Weights & Biases run, offline unless ``mode: online``.

    Attributes:
        enabled: log to W&B.
        mode: ``offline`` (default: files under ``<dir>/wandb/``, upload later with
            ``wandb sync``) or ``online``.
        project, entity, group, tags: where the run goes and how it is labelled.
        name: the run's display name (default: the run folder's name).
        dir: the folder W&B makes its ``wandb/`` folder in (default ``<output_dir>``).
    """

    key = "wandb"
    module = "wandb"

    mode: Literal["offline", "online"] = "offline"
    project: str = "aligntk"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = Field(default_factory=list)
    dir: LocalPath | None = None


class MlflowOptions(_Sink):
    """``plugins.sinks.mlflow``: an MLflow run, in a local file store by default.

    Attributes:
        enabled: log to MLflow.
        tracking_uri: the tracking store (default ``file:<output_dir>/mlruns``); a file
            store is opted into for MLflow 3 (``MLFLOW_ALLOW_FILE_STORE``).
        experiment: the experiment's name (created when missing).
        run_name: the run's name (default: the run folder's name).
    """

    key = "mlflow"
    module = "mlflow"

    tracking_uri: str | None = None
    experiment: str = "aligntk"
    run_name: str | None = None


class CsvOptions(_Sink):
    """``plugins.sinks.csv``: every logged record as a row of one CSV file.

    Attributes:
        enabled: write the file.
        path: where (default ``<output_dir>/metrics.csv``); relative to the recipe's folder.
    """

    key = "csv"
    module = "csv"

    path: LocalPath | None = None


class SinksOptions(ComponentConfig):
    """``plugins: {sinks: {tensorboard: {...}, wandb: {...}, mlflow: {...}, csv: {...}}}``.

    Every sink is off until its section says ``enabled: true``; ``plugins.sinks.enabled:
    false`` (aligntk's switch for every plugin) turns them all off at once.
    """

    tensorboard: TensorBoardOptions = Field(default_factory=TensorBoardOptions)
    wandb: WandbOptions = Field(default_factory=WandbOptions)
    mlflow: MlflowOptions = Field(default_factory=MlflowOptions)
    csv: CsvOptions = Field(default_factory=CsvOptions)
