"""The ``aligntk select`` spec: what to score, with which models, and what to keep.

Given as a small YAML file (``aligntk select SELECT.yaml``), as flags, or both (flags win).
Paths in a YAML file are relative to the file's folder, as recipe paths are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aligntk import RecipeError, format_errors

Score = Literal["perplexity", "ifd", "reward", "learnability", "confidence", "loss"]
Task = Literal["causal_lm", "sequence_classification"]

#: Scores that need one model (``model``); learnability needs ``weak`` and ``strong``.
ONE_MODEL: tuple[str, ...] = ("perplexity", "ifd", "reward", "confidence", "loss")
#: Scores from a sequence-classification model's class probabilities (rows: a text, and a label for loss).
CLASSIFIER_SCORES: tuple[str, ...] = ("confidence", "loss")


class SelectSpec(BaseModel):
    """What ``aligntk select`` does. Exactly one of ``keep_top``, ``keep_fraction``, ``threshold``.

    By default the highest scores are kept; ``lowest: true`` keeps the lowest (low
    perplexity drops noisy rows, high perplexity keeps the hard ones).

    ``task`` says what the models are: ``confidence`` and ``loss`` need sequence
    classifiers, ``perplexity`` and ``ifd`` causal LMs; ``learnability`` compares two causal
    LMs' completion losses, or with ``task: sequence_classification`` two classifiers'
    label losses.
    """

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="a data file read_rows reads (.jsonl .json .csv .parquet .arrow, save_to_disk folder)")
    score: Score
    out: Path = Field(description="output folder; must not exist")
    model: Path | None = Field(None, description="model folder (perplexity, ifd, reward, confidence, loss)")
    weak: Path | None = Field(None, description="weak model folder (learnability)")
    strong: Path | None = Field(None, description="strong model folder (learnability)")
    tokenizer: Path | None = Field(None, description="tokenizer folder; default: each model's own folder")
    task: Task | None = Field(None, description="what the models are; default: what the score needs (learnability: causal_lm)")
    keep_top: int | None = Field(None, ge=1)
    keep_fraction: float | None = Field(None, gt=0.0, le=1.0)
    threshold: float | None = None
    lowest: bool = False
    batch_size: int = Field(32, ge=1)
    max_length: int | None = Field(None, ge=2, description="a row with more tokens is an error")
    device: str = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's); 1 is fastest on busy shared cores")
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    messages_key: str = "messages"
    text_key: str = "text"
    label_key: str = Field("label", description="loss and classifier learnability: an integer class or a list of probabilities")

    @property
    def classifier(self) -> bool:
        """Whether the models are sequence classifiers (scored on ``text_key``, and ``label_key`` for losses)."""
        return self.score in CLASSIFIER_SCORES or (self.score == "learnability" and self.task == "sequence_classification")

    @model_validator(mode="after")
    def _check(self) -> SelectSpec:
        rules = [k for k in ("keep_top", "keep_fraction", "threshold") if getattr(self, k) is not None]
        if len(rules) != 1:
            raise ValueError(
                "give exactly one of keep_top, keep_fraction, threshold" + (f" (got {', '.join(rules)})" if rules else "")
            )
        if self.score in ONE_MODEL:
            if self.model is None:
                raise ValueError(f"score {self.score} needs model")
            if self.weak is not None or self.strong is not None:
                raise ValueError(f"score {self.score} uses model, not weak/strong")
        elif self.weak is None or self.strong is None:
            raise ValueError("score learnability needs weak and strong")
        elif self.model is not None:
            raise ValueError("score learnability uses weak and strong, not model")
        if self.task is not None and self.score not in ("learnability", "reward"):
            needs = "sequence_classification" if self.score in CLASSIFIER_SCORES else "causal_lm"
            if self.task != needs:
                raise ValueError(f"score {self.score} needs task {needs}, got task {self.task}")
        if self.task == "causal_lm" and self.score == "reward":
            raise ValueError("score reward needs a scalar-head (sequence_classification) model, got task causal_lm")
        return self


PATH_KEYS = ("data", "out", "model", "weak", "strong", "tokenizer")


def read_spec(path: str | Path | None, flags: dict[str, Any]) -> SelectSpec:
    """The spec from a YAML file (optional) with ``flags`` (non-``None`` values) on top.

    Raises:
        RecipeError: the file is missing or not a YAML mapping, or a key is unknown or
            invalid; one line naming the key.
    """
    raw: dict[str, Any] = {}
    where = "select"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise RecipeError(f"{path}: spec file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise RecipeError(f"{path}: the spec must be a mapping of keys to values")
        base = path.parent
        raw = {k: (str(base / v) if k in PATH_KEYS and isinstance(v, str) else v) for k, v in loaded.items()}
    raw.update({k: v for k, v in flags.items() if v is not None and v is not False})
    try:
        return SelectSpec.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{where}: {format_errors(exc, SelectSpec, ()).replace('(recipe): ', '')}") from None


__all__ = ["CLASSIFIER_SCORES", "ONE_MODEL", "Score", "SelectSpec", "Task", "read_spec"]
