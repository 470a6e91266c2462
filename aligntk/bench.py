"""Benchmark suites: variants of a recipe, each over several seeds, on the one engine.

A suite is a YAML file (read with ``yaml.safe_load``, validated like a recipe, errors
naming the key path)::

    recipe: ../../recipes/quickstart.yaml   # the base recipe, relative to this file
    seeds: [0, 1, 2]                        # every variant runs once per seed
    budget: {max_steps: 200}                # train.max_steps of every variant, unless it overrides it
    overrides: {train.eval_every: 50}       # dotted keys for every variant
    variants:
      - name: sft
      - name: dpo
        recipe: ../../recipes/dpo.yaml      # its own recipe instead of the base one
        init_from: sft                      # model.path := the sft run's model/ folder, same seed
        overrides: {loss.beta: 0.1}         # dotted keys, as on the command line

Each run goes through ``validate_recipe`` and ``aligntk.engine.train``, exactly as
``aligntk run`` does. A run that raises (a recipe error included) is recorded as failed
with its one-line error and the others go on; a run whose parent failed is recorded as
skipped. ``run_suite`` writes ``results.md``, ``results.csv``, ``results.json`` and PNG
plots into one folder, with each run's own folder under ``runs/``.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import platform
import re
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, PositiveInt, ValidationError

from .errors import AligntkError, RecipeError
from .plugins import Plugins
from .recipe import LocalFile, StrictModel, apply_override, format_errors, read_recipe, validate_recipe

# --------------------------------------------------------------------------------------
# The suite file
# --------------------------------------------------------------------------------------

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_MODEL_KEY = re.compile(r"^(model|models\.[A-Za-z0-9_]+)$")


class Budget(StrictModel):
    """What every variant gets unless it overrides the key itself."""

    max_steps: PositiveInt | None = Field(None, description="train.max_steps of every variant")


class Variant(StrictModel):
    """One arm of the comparison: a recipe (the base one or its own) plus dotted overrides."""

    name: str = Field(pattern=_NAME)
    recipe: LocalFile | None = Field(None, description="this variant's recipe; default: the suite's")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted recipe keys -> values")
    init_from: str | None = Field(None, description="start from this variant's trained model (same seed)")
    models_from: dict[str, str] = Field(
        default_factory=dict, description="model section ('model' or 'models.ROLE') -> variant whose model it loads"
    )


class Suite(StrictModel):
    """A whole suite: variants x seeds runs."""

    name: str | None = Field(None, pattern=_NAME, description="default: the registered name or the file's stem")
    recipe: LocalFile | None = Field(None, description="the base recipe, relative to the suite file")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    budget: Budget = Budget()
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys for every variant, before its own")
    output_dir: str | None = Field(None, description="default for --out")
    metrics: list[str] | None = Field(None, description="evaluation metrics in the table and plots; default: all")
    description: str | None = None
    variants: list[Variant] = Field(min_length=1)

    def parents(self, variant: Variant) -> dict[str, str]:
        """Model section -> the variant it loads from (``init_from`` is ``{"model": ...}``)."""
        links = dict(variant.models_from)
        if variant.init_from is not None:
            links["model"] = variant.init_from
        return links


def read_suite(path: str | Path, overrides: Sequence[str] = ()) -> Suite:
    """Read and validate a suite file; ``RecipeError`` names the key path of any mistake."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: suite file not found")
    raw = read_recipe(path, overrides)
    try:
        suite = Suite.model_validate(raw, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        raise RecipeError(f"{path}: {format_errors(exc, Suite, ())}") from None
    _check_links(suite, path)
    return suite


def _check_links(suite: Suite, path: Path) -> None:
    names = [v.name for v in suite.variants]
    for i, variant in enumerate(suite.variants):
        where = f"{path}: variants.{i}"
        if variant.name in names[:i]:
            raise RecipeError(f"{where}.name: variant {variant.name!r} is named twice")
        if variant.recipe is None and suite.recipe is None:
            raise RecipeError(f"{where}.recipe: no recipe; give the variant one or the suite a base 'recipe'")
        if variant.init_from is not None and "model" in variant.models_from:
            raise RecipeError(f"{where}.init_from: models_from.model says the same; give one")
        for key, parent in suite.parents(variant).items():
            at = "init_from" if key == "model" and variant.init_from is not None else f"models_from.{key}"
            if not _MODEL_KEY.match(key):
                raise RecipeError(f"{where}.{at}: expected 'model' or 'models.ROLE', got {key!r}")
            if parent not in names:
                close = difflib.get_close_matches(parent, names, n=1)
                hint = f", did you mean {close[0]!r}?" if close else f" (variants: {', '.join(names)})"
                raise RecipeError(f"{where}.{at}: unknown variant {parent!r}{hint}")
    _ordered(suite, path)


def _ordered(suite: Suite, path: Path | None = None) -> list[Variant]:
    """The variants with every parent before its children; a cycle is an error."""
    by_name = {v.name: v for v in suite.variants}
    done: list[Variant] = []
    visiting: list[str] = []

    def visit(variant: Variant) -> None:
        if variant in done:
            return
        if variant.name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(variant.name) :], variant.name])
            raise RecipeError(f"{path}: variants: the models_from/init_from links form a cycle: {cycle}")
        visiting.append(variant.name)
        for parent in suite.parents(variant).values():
            visit(by_name[parent])
        visiting.pop()
        done.append(variant)

    for variant in suite.variants:
        visit(variant)
    return done


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """One variant x seed run, as results.json and results.csv hold it."""

    variant: str
    seed: int
    status: str = "pending"  # ok | failed | skipped
    error: str | None = None
    run_dir: str = ""
    parents: list[str] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    total_steps: int = 0  # this run's plus every run it starts or learns from
    total_tokens: int = 0
    wall_s: float = 0.0
    first_eval: dict[str, float] = field(default_factory=dict)
    final_eval: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[list[float]]] = field(default_factory=dict)  # metric -> [[step, value], ...]


def resolve_suite(target: str, plugins: Plugins) -> tuple[Path, str]:
    """A suite file path, or the name a plugin registered; returns (path, name)."""
    path = Path(target)
    if path.is_file():
        return path, path.stem
    registered = plugins.suites.get(target)
    if registered is not None:
        if not registered.path.is_file():
            raise AligntkError(f"suite {target!r} (plugin {registered.plugin!r}): file not found: {registered.path}")
        return registered.path, registered.name
    names = ", ".join(sorted(plugins.suites)) or "none"
    raise AligntkError(
        f"{target}: no such suite file, and no plugin registers a suite by that name (registered: {names})"
    )


def run_suite(
    target: str | Path,
    plugins: Plugins,
    *,
    out: str | Path | None = None,
    only: Sequence[str] = (),
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
    command: str | None = None,
) -> list[RunRecord]:
    """Run every selected variant x seed of a suite and write its results folder.

    ``only`` names variants to run (their parents run too). The results folder is
    ``out``, else the suite's ``output_dir``, else ``runs/bench/NAME``; one that already
    holds files needs ``overwrite``, which replaces the suite's runs and result files
    there and deletes nothing else. ``command`` is the command line results.md names.
    """
    from .engine import train  # torch and transformers load only when running

    path, name = resolve_suite(str(target), plugins)
    suite = read_suite(path, overrides)
    name = suite.name or name
    out_dir = Path(out or suite.output_dir or f"runs/bench/{name}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise AligntkError(f"{out_dir}: already holds files; give --overwrite to replace them, or --out elsewhere")
    variants = _selected(suite, only)
    runs_dir = out_dir / "runs"
    records: dict[tuple[str, int], RunRecord] = {}
    total = len(variants) * len(suite.seeds)
    started, load_before = time.perf_counter(), _load()
    for variant in variants:
        for seed in suite.seeds:
            rec = RunRecord(variant.name, seed, run_dir=str(runs_dir / variant.name / f"seed{seed}"))
            links = suite.parents(variant)
            rec.parents = sorted(set(links.values()))
            records[variant.name, seed] = rec
            echo(f"bench [{len(records)}/{total}] {variant.name} seed {seed}")
            failed = [p for p in rec.parents if records[p, seed].status != "ok"]
            if failed:
                rec.status, rec.error = "skipped", f"not run: parent {failed[0]!r} (seed {seed}) did not finish"
                echo(f"  skipped: {rec.error}")
                continue
            t0 = time.perf_counter()
            try:
                raw = _variant_recipe(suite, variant, seed, Path(rec.run_dir), links, runs_dir)
                source = variant.recipe or suite.recipe
                result = train(validate_recipe(raw, plugins.registry, source=source), plugins, overwrite=True)
            except Exception as exc:  # any failure is this run's result; the others go on
                rec.status, rec.error = "failed", _one_line(exc)
                Path(rec.run_dir).mkdir(parents=True, exist_ok=True)
                (Path(rec.run_dir) / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
                echo(f"  failed: {rec.error}")
            else:
                _record(rec, result)
                ancestors = _ancestors(suite, variant)
                rec.total_steps = rec.steps + sum(records[a, seed].steps for a in ancestors)
                rec.total_tokens = rec.tokens + sum(records[a, seed].tokens for a in ancestors)
                shown = "  ".join(f"{k} {v:.4g}" for k, v in rec.final_eval.items())
                echo(f"  ok in {time.perf_counter() - t0:.1f} s: {shown}")
            rec.wall_s = round(time.perf_counter() - t0, 2)
    header = {
        "suite": name,
        "file": str(path),
        "seeds": suite.seeds,
        "budget": suite.budget.model_dump(),
        "description": suite.description,
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": _machine(load_before),
        "command": command,
    }
    write_results(out_dir, header, list(records.values()), suite.metrics)
    echo(f"results: {out_dir}/results.md")
    return list(records.values())


def _selected(suite: Suite, only: Sequence[str]) -> list[Variant]:
    """The variants to run, parents first: all of them, or ``only`` and their ancestors."""
    ordered = _ordered(suite)
    if not only:
        return ordered
    names = [v.name for v in ordered]
    for name in only:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f", did you mean {close[0]!r}?" if close else f" (variants: {', '.join(names)})"
            raise AligntkError(f"--only {name}: no such variant{hint}")
    keep = set(only)
    for variant in reversed(ordered):
        if variant.name in keep:
            keep |= set(suite.parents(variant).values())
    return [v for v in ordered if v.name in keep]


def _ancestors(suite: Suite, variant: Variant) -> list[str]:
    by_name = {v.name: v for v in suite.variants}
    found: list[str] = []
    stack = list(suite.parents(variant).values())
    while stack:
        name = stack.pop()
        if name not in found:
            found.append(name)
            stack += suite.parents(by_name[name]).values()
    return found


def _variant_recipe(
    suite: Suite, variant: Variant, seed: int, run_dir: Path, links: dict[str, str], runs_dir: Path
) -> dict[str, Any]:
    """The recipe dict of one run: base or own recipe, budget, suite then variant overrides, parents, seed, folder."""
    raw = read_recipe(variant.recipe or suite.recipe)  # type: ignore[arg-type]
    if suite.budget.max_steps is not None:
        apply_override(raw, f"train.max_steps={suite.budget.max_steps}")
    for key, value in {**suite.overrides, **variant.overrides}.items():
        apply_override(raw, f"{key}={yaml.safe_dump(value, default_flow_style=True)}")
    for key, parent in links.items():
        model_dir = (runs_dir / parent / f"seed{seed}" / "model").resolve()
        apply_override(raw, f"{key}.path={yaml.safe_dump(str(model_dir), default_flow_style=True)}")
        section = _section(raw, key)
        for other_source in ("config", "tokenizer"):  # the saved folder holds both
            section.pop(other_source, None)
    raw["seed"] = seed
    raw["output_dir"] = str(run_dir)
    return raw


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    node: Any = raw
    for part in key.split("."):
        node = node[part]
    return node


def _record(rec: RunRecord, result: Any) -> None:
    """Fill a finished run's numbers from the engine's result and its metrics.jsonl."""
    rec.status = "ok"
    rec.steps = int(result.steps)
    rec.tokens = int(result.last_train.get("tokens_seen", 0))
    rec.first_eval = {k: float(v) for k, v in result.first_eval.items()}
    rec.final_eval = {k: float(v) for k, v in result.last_eval.items()}
    if result.stopped:
        rec.error = f"stopped early at step {result.steps}: {result.stopped}"
    curves: dict[str, list[list[float]]] = {}
    metrics_file = Path(rec.run_dir) / "metrics.jsonl"
    for line in metrics_file.read_text(encoding="utf-8").splitlines() if metrics_file.is_file() else []:
        row = json.loads(line)
        if row.get("split") == "train" and "loss" in row:
            curves.setdefault("loss", []).append([row["step"], row["loss"]])
        elif row.get("split") == "eval":
            for key, value in row.items():
                if key not in ("split", "step") and isinstance(value, (int, float)):
                    curves.setdefault(key, []).append([row["step"], value])
    rec.curves = curves


def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, AligntkError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _machine(load_before: list[float] | None) -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": load_before,
        "load_avg_end": _load(),
    }


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


def summarize(records: Sequence[RunRecord], metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per variant: seeds that finished, each final metric's mean/std/min/max, budget, status."""
    rows = []
    for name in dict.fromkeys(r.variant for r in records):
        runs = [r for r in records if r.variant == name]
        ok = [r for r in runs if r.status == "ok"]
        keys = list(metrics) if metrics else list(dict.fromkeys(k for r in ok for k in r.final_eval))
        stats = {}
        for key in keys:
            values = [r.final_eval[key] for r in ok if key in r.final_eval]
            if values:
                stats[key] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values),
                    "max": max(values),
                    "n": len(values),
                }
        status = "ok" if len(ok) == len(runs) else runs[0].status if not ok else f"partial ({len(ok)}/{len(runs)})"
        rows.append(
            {
                "variant": name,
                "seeds": f"{len(ok)}/{len(runs)}",
                "metrics": stats,
                "steps": _mean_int([r.steps for r in ok]),
                "total_steps": _mean_int([r.total_steps for r in ok]),
                "tokens": _mean_int([r.tokens for r in ok]),
                "total_tokens": _mean_int([r.total_tokens for r in ok]),
                "wall_s": round(statistics.fmean([r.wall_s for r in ok]), 1) if ok else None,
                "status": status,
                "parents": runs[0].parents,
            }
        )
    return rows


def _mean_int(values: list[int]) -> int | None:
    return round(statistics.fmean(values)) if values else None


def write_results(
    out_dir: Path, header: dict[str, Any], records: Sequence[RunRecord], metrics: Sequence[str] | None = None
) -> None:
    """results.json (everything), results.csv (one row per run), results.md (one row per variant), plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, metrics)
    try:
        from .plots import plot_suite

        plots = plot_suite(out_dir, records, metrics)
    except ImportError:  # matplotlib is an extra: the tables are written without it
        plots = []
        header = {**header, "note": "no plots: matplotlib is not installed (pip install 'aligntk[bench]')"}
    payload = {**header, "summary": summary, "runs": [asdict(r) for r in records], "plots": plots}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    _write_csv(out_dir / "results.csv", records)
    (out_dir / "results.md").write_text(_markdown(header, summary, records, plots), encoding="utf-8")


def _write_csv(path: Path, records: Sequence[RunRecord]) -> None:
    keys = list(dict.fromkeys(k for r in records for k in r.final_eval))
    columns = ["variant", "seed", "status", "steps", "total_steps", "tokens", "total_tokens", "wall_s"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*columns, *keys, "parents", "run_dir", "error"])
        for r in records:
            row = [getattr(r, c) for c in columns]
            metrics = [r.final_eval.get(k, "") for k in keys]
            writer.writerow([*row, *metrics, " ".join(r.parents), r.run_dir, r.error or ""])


def _fmt(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"


def _markdown(
    header: dict[str, Any], summary: list[dict[str, Any]], records: Sequence[RunRecord], plots: list[str]
) -> str:
    keys = list(dict.fromkeys(k for row in summary for k in row["metrics"]))
    lines = [f"# Suite `{header['suite']}`", ""]
    for key in ("description", "note"):
        if header.get(key):
            lines += [str(header[key]).strip(), ""]
    machine = header["machine"]
    lines += [
        f"Suite file `{header['file']}`; seeds {header['seeds']}; budget {header['budget']}; "
        f"{len(records)} runs in {header['wall_s']} s wall time.",
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']} "
        f"({machine['torch_threads']} threads); load average (1, 5, 15 min) {machine['load_avg_start']} at the start, "
        f"{machine['load_avg_end']} at the end.",
        "",
        "Final evaluation metrics: mean ± std over seeds (min to max). Steps and tokens are this "
        "variant's own optimizer steps and training tokens; the totals add every run it starts "
        "from or learns from. Wall time is per run (mean over seeds).",
        "",
    ]
    columns = ["variant", "seeds", *keys, "steps", "total steps", "tokens", "total tokens", "wall s", "status"]
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in summary:
        cells = [row["variant"] + (f" (from {', '.join(row['parents'])})" if row["parents"] else ""), row["seeds"]]
        for key in keys:
            s = row["metrics"].get(key)
            cells.append(f"{_fmt(s['mean'])} ± {_fmt(s['std'])} ({_fmt(s['min'])} to {_fmt(s['max'])})" if s else "-")
        for key in ("steps", "total_steps", "tokens", "total_tokens", "wall_s"):
            cells.append("-" if row[key] is None else f"{row[key]:,}" if isinstance(row[key], int) else str(row[key]))
        cells.append(row["status"])
        lines.append("| " + " | ".join(cells) + " |")
    problems = [r for r in records if r.error]
    if problems:
        lines += ["", "## Failed and skipped runs", ""]
        lines += [f"- {r.variant} seed {r.seed} ({r.status}): {r.error}" for r in problems]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in plots]
    if header.get("command"):
        lines += ["", f"Made with `{header['command']}`."]
    return "\n".join(lines) + "\n"
