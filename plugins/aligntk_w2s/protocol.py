"""The weak-to-strong protocol of Burns et al. 2023 (https://arxiv.org/abs/2312.09390), one recipe.

For each seed: split the training rows in two; train the weak model on the ground truth
of half A; label half B with it once (soft labels, written to ``weak_labels.jsonl`` in the
weak run's folder); train the strong model on those labels with each chosen loss; train
the strong ceiling on B's ground truth. Every run is an ordinary aligntk recipe run by
``aligntk.train`` and evaluated on the held-out test file by the ``accuracy``
evaluator. Accuracies and PGR (at the end of training and at the best evaluation) are
written to ``results.json`` and ``results.md`` in the output folder.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from aligntk import (
    AligntkError,
    ComponentSpec,
    DataContext,
    LocalFile,
    Plugins,
    RecipeError,
    format_errors,
    load_plugins,
    read_recipe,
    read_rows,
    validate_recipe,
)

from .data import ClassificationData, ClassificationDataConfig
from .labelling import LABELS_FILE, label_examples, write_labels
from .report import summarize, write_results

log = logging.getLogger("aligntk.w2s")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProtocolData(_Strict):
    """The task: a training file split in two, and a held-out test file."""

    path: LocalFile
    test_path: LocalFile
    text_key: str = "text"
    label_key: str = "label"
    num_classes: int = Field(2, ge=2)
    max_length: PositiveInt = 128
    weak_fraction: float = Field(0.5, gt=0, lt=1, description="share of training rows in half A (the weak model's)")


class Role(_Strict):
    """A model and how it trains: ``train`` keys override the shared ones, ``update`` replaces it."""

    model: dict[str, Any] = Field(description="an aligntk recipe 'model' section (task: sequence_classification)")
    train: dict[str, Any] = Field(default_factory=dict)
    update: dict[str, Any] | None = None


class StudentLoss(ComponentSpec):
    """A student loss: ``name`` and its options; ``tag`` names it in the results (default: name)."""

    tag: str | None = None

    @property
    def key(self) -> str:
        return self.tag or self.name

    def section(self) -> dict[str, Any]:
        return {"name": self.name, **(self.model_extra or {})}


class Protocol(_Strict):
    """A weak-to-strong protocol recipe (``aligntk w2s RECIPE``)."""

    output_dir: str = "runs/w2s"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    data: ProtocolData
    weak: Role
    strong: Role
    train: dict[str, Any] = Field(description="the aligntk 'train' section every run shares")
    update: dict[str, Any] = Field(default_factory=lambda: {"name": "full"})
    losses: list[StudentLoss] = Field(min_length=1, description="the student's losses, one strong run each")
    eval_batch_size: PositiveInt = 64


@dataclass
class RunSummary:
    """Test accuracy of one run: at the end and at its best evaluation after step 0."""

    final: float
    best: float
    best_step: int

    def as_dict(self) -> dict[str, float | int]:
        return {"final": self.final, "best": self.best, "best_step": self.best_step}


def read_protocol(path: str | Path, overrides: Sequence[str] = ()) -> Protocol:
    """Read and validate a protocol recipe; paths are relative to its folder."""
    raw = read_recipe(path, overrides)
    try:
        protocol = Protocol.model_validate(raw, context={"base_dir": Path(path).resolve().parent})
    except ValidationError as exc:
        raise RecipeError(f"{path}: {format_errors(exc, Protocol, ())}") from None
    keys = [loss.key for loss in protocol.losses]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise RecipeError(f"{path}: losses: {repeated} appear twice; give each a distinct 'tag'")
    return protocol


def split_rows(path: Path, weak_fraction: float, seed: int, folder: Path) -> tuple[Path, Path]:
    """Shuffle the training rows with ``seed`` and write half A (weak) and half B (strong) as JSON Lines."""
    rows = [row for _, row in read_rows(path)]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = round(len(rows) * weak_fraction)
    if not 0 < cut < len(rows):
        raise AligntkError(f"{path}: {len(rows)} rows cannot be split {weak_fraction:g} / {1 - weak_fraction:g}")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, part in (("half_a.jsonl", order[:cut]), ("half_b.jsonl", order[cut:])):
        with (folder / name).open("w") as f:
            for i in part:
                f.write(json.dumps(rows[i]) + "\n")
        out.append(folder / name)
    return out[0], out[1]


class W2SProtocol:
    """Builds the recipes of one protocol and runs them in order."""

    def __init__(self, protocol: Protocol, source: Path | None = None, plugins: Plugins | None = None):
        self.p = protocol
        self.source = source
        self.plugins = plugins or load_plugins()

    def recipe(self, role: Role, name: str, seed: int, train_path: Path, losses: list[dict[str, Any]]) -> dict[str, Any]:
        """An ordinary aligntk recipe (a dict) for one run of the protocol."""
        d = self.p.data
        data: dict[str, Any] = {
            "name": "classification",
            "path": str(train_path.resolve()),
            "eval_path": str(d.test_path),
            "text_key": d.text_key,
            "label_key": d.label_key,
            "num_classes": d.num_classes,
            "max_length": d.max_length,
        }
        return {
            "output_dir": str(Path(self.p.output_dir) / f"seed_{seed}" / name),
            "seed": seed,
            "model": role.model,
            "data": data,
            "loss": losses,
            "update": role.update if role.update is not None else self.p.update,
            "evaluators": [{"name": "accuracy", "batch_size": self.p.eval_batch_size}],
            "train": {**self.p.train, **role.train},
        }

    def run_recipe(self, raw: dict[str, Any], overwrite: bool) -> RunSummary:
        """Validate and train one recipe (the engine's ``train``); summarize its test accuracy."""
        from aligntk import run_resolved  # the engine loads only when a run trains

        resolved = validate_recipe(raw, self.plugins.registry, source=self.source)
        log.info("w2s: training %s", raw["output_dir"])
        result = run_resolved(resolved, self.plugins, overwrite=overwrite)
        return read_summary(result.run_dir)

    def label(self, weak_dir: Path, half_b: Path, seed: int) -> Path:
        """Label half B with the trained weak model, once; return the labels file."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        d = self.p.data
        tokenizer = AutoTokenizer.from_pretrained(weak_dir / "model")
        model = AutoModelForSequenceClassification.from_pretrained(weak_dir / "model")
        config = ClassificationDataConfig(
            path=half_b, text_key=d.text_key, label_key=d.label_key, num_classes=d.num_classes, max_length=d.max_length
        )
        data = ClassificationData(config)
        examples = data.load(DataContext(tokenizer=tokenizer, seed=seed)).train
        probs = label_examples(model, examples, data.collate, self.p.eval_batch_size)
        return write_labels(weak_dir / LABELS_FILE, probs)

    def run_seed(self, seed: int, overwrite: bool) -> dict[str, Any]:
        """The whole protocol for one seed: weak, labels, each student, ceiling."""
        seed_dir = Path(self.p.output_dir) / f"seed_{seed}"
        half_a, half_b = split_rows(self.p.data.path, self.p.data.weak_fraction, seed, seed_dir / "data")
        ground_truth = [{"name": "w2s_ce"}]  # soft cross-entropy on one-hot targets: plain CE
        students = {loss.key: self.recipe(self.p.strong, f"strong_{loss.key}", seed, half_b, [loss.section()])
                    for loss in self.p.losses}
        weak_recipe = self.recipe(self.p.weak, "weak", seed, half_a, ground_truth)
        ceiling_recipe = self.recipe(self.p.strong, "ceiling", seed, half_b, ground_truth)
        # Check every recipe before the first model trains: a typo in a loss fails now.
        for raw in (weak_recipe, ceiling_recipe, *students.values()):
            try:
                validate_recipe(raw, self.plugins.registry, source=self.source)
            except RecipeError as exc:
                run = Path(raw["output_dir"]).name
                raise RecipeError(f"the recipe built for run {run!r} (keys as in 'aligntk run'): {exc}") from None

        self.run_recipe(weak_recipe, overwrite)
        labels = self.label(Path(weak_recipe["output_dir"]), half_b, seed)
        for raw in students.values():  # validated above on ground truth; now on the cached labels
            raw["data"]["soft_labels_path"] = str(labels.resolve())
            self.run_recipe(raw, overwrite)
        self.run_recipe(ceiling_recipe, overwrite)
        return seed_record(seed_dir, seed, list(students), self.p.data.label_key)

    def run(self, overwrite: bool = False, skip_finished: bool = False) -> dict[str, Any]:
        """Every seed, then ``results.json`` and ``results.md``; refuse PGR when the ceiling doesn't beat weak.

        Raises:
            AligntkError: after writing the results, when the ceiling does not beat the
                weak model for some seed (PGR is undefined there).
        """
        losses = [loss.key for loss in self.p.losses]
        per_seed: list[dict[str, Any]] = []
        for seed in self.p.seeds:
            seed_dir = Path(self.p.output_dir) / f"seed_{seed}"
            if skip_finished and (seed_dir / "ceiling" / "model").is_dir():  # the ceiling trains last
                log.info("w2s: seed %d already finished in %s; reading its results", seed, seed_dir)
                per_seed.append(seed_record(seed_dir, seed, losses, self.p.data.label_key))
            else:
                per_seed.append(self.run_seed(seed, overwrite))
            # Written after every seed, so a long protocol stopped part-way keeps what it measured.
            results = summarize(per_seed, losses)
            write_results(Path(self.p.output_dir), results)
        if results["refused"]:
            raise AligntkError(
                f"PGR refused: {'; '.join(results['refused'])} (accuracies are in {self.p.output_dir}/results.json)"
            )
        return results


def read_summary(run_dir: Path) -> RunSummary:
    """Final and best test accuracy from a run's ``metrics.jsonl`` (evaluations after step 0)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("split") == "eval" and "accuracy" in r and r["step"] > 0]
    if not evals:
        raise AligntkError(f"{run_dir}: no accuracy evaluation after step 0 in metrics.jsonl")
    best = max(evals, key=lambda r: r["accuracy"])  # the first of equal bests
    return RunSummary(final=evals[-1]["accuracy"], best=best["accuracy"], best_step=best["step"])


def seed_record(seed_dir: Path, seed: int, losses: Sequence[str], label_key: str = "label") -> dict[str, Any]:
    """What one seed measured, read back from its run folders (so finished seeds can be collected again)."""
    labels = seed_dir / "weak" / LABELS_FILE
    truth = [row[label_key] for _, row in read_rows(seed_dir / "data" / "half_b.jsonl")]
    weak_labels = [max(range(len(row["probs"])), key=row["probs"].__getitem__) for _, row in read_rows(labels)]
    return {
        "seed": seed,
        "weak": read_summary(seed_dir / "weak").as_dict(),
        "weak_label_accuracy_on_b": sum(int(p == int(t)) for p, t in zip(weak_labels, truth)) / len(truth),
        "labels_file": str(labels),
        "ceiling": read_summary(seed_dir / "ceiling").as_dict(),
        "strong": {loss: read_summary(seed_dir / f"strong_{loss}").as_dict() for loss in losses},
    }


def collect_results(output_dir: Path, losses: Sequence[str]) -> dict[str, Any]:
    """Results of every finished seed under ``output_dir`` (a ceiling model saved), without training."""
    seeds = sorted(int(d.name.removeprefix("seed_")) for d in output_dir.glob("seed_*") if (d / "ceiling" / "model").is_dir())
    results = summarize([seed_record(output_dir / f"seed_{s}", s, losses) for s in seeds], losses)
    write_results(output_dir, results)
    return results


def run_protocol(
    path: str | Path,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    skip_finished: bool = False,
    plugins: Plugins | None = None,
) -> dict[str, Any]:
    """Read a protocol recipe and run it; return what ``results.json`` holds.

    ``skip_finished`` reads back seeds whose runs all finished instead of training them again.
    """
    protocol = W2SProtocol(read_protocol(path, overrides), Path(path), plugins)
    return protocol.run(overwrite=overwrite, skip_finished=skip_finished)
