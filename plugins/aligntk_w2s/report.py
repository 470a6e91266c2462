"""Results of a weak-to-strong protocol: PGR per seed and loss, medians and spread, a Markdown table."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .metrics.pgr.pgr import performance_gap_recovered

WHEN = ("final", "best")


def pgr_or_reason(weak: float, w2s: float, ceiling: float) -> tuple[float | None, str | None]:
    """PGR from the shipped metric's formula, or ``None`` and its refusal message."""
    try:
        return performance_gap_recovered(weak, w2s, ceiling), None
    except ValueError as exc:
        return None, str(exc)


def spread(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Median, min, max and count of the defined values."""
    kept = [v for v in values if v is not None]
    if not kept:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(kept), "min": min(kept), "max": max(kept), "n": len(kept)}


def summarize(per_seed: list[dict[str, Any]], losses: Sequence[str]) -> dict[str, Any]:
    """Add PGR (``final`` and ``best``) per seed and loss, and the median and spread over seeds."""
    refused: list[str] = []
    for run in per_seed:
        run["pgr"] = {}
        for loss in losses:
            run["pgr"][loss] = {}
            for when in WHEN:
                value, reason = pgr_or_reason(run["weak"][when], run["strong"][loss][when], run["ceiling"][when])
                run["pgr"][loss][when] = value
                if reason is not None:
                    refused.append(f"seed {run['seed']} ({when}): {reason}")
    summary: dict[str, Any] = {}
    for when in WHEN:
        summary[when] = {
            "weak": spread([r["weak"][when] for r in per_seed]),
            "ceiling": spread([r["ceiling"][when] for r in per_seed]),
            "strong": {loss: spread([r["strong"][loss][when] for r in per_seed]) for loss in losses},
            "pgr": {loss: spread([r["pgr"][loss][when] for r in per_seed]) for loss in losses},
        }
    return {
        "losses": list(losses),
        "seeds": [r["seed"] for r in per_seed],
        "runs": per_seed,
        "summary": summary,
        "refused": sorted(set(refused)),
    }


def _fmt(stats: dict[str, Any]) -> str:
    if stats["median"] is None:
        return "undefined"
    if stats["n"] == 1:
        return f"{stats['median']:.3f}"
    return f"{stats['median']:.3f} ({stats['min']:.3f} to {stats['max']:.3f})"


def markdown(results: dict[str, Any]) -> str:
    """A Markdown table: test accuracy and PGR, median (min to max) over seeds."""
    lines = [
        "# Weak-to-strong results",
        "",
        f"Seeds: {results['seeds']}. Test accuracy and PGR, median (min to max) over seeds. "
        "'best' is each run's best test evaluation during training (an oracle choice of step).",
        "",
        "| model | accuracy, end | accuracy, best | PGR, end | PGR, best |",
        "|---|---|---|---|---|",
    ]
    s = results["summary"]
    lines.append(f"| weak | {_fmt(s['final']['weak'])} | {_fmt(s['best']['weak'])} | | |")
    for loss in results["losses"]:
        lines.append(
            f"| weak→strong, {loss} | {_fmt(s['final']['strong'][loss])} | {_fmt(s['best']['strong'][loss])} "
            f"| {_fmt(s['final']['pgr'][loss])} | {_fmt(s['best']['pgr'][loss])} |"
        )
    lines.append(f"| strong ceiling | {_fmt(s['final']['ceiling'])} | {_fmt(s['best']['ceiling'])} | | |")
    if results["refused"]:
        lines += ["", "PGR refused:", *(f"- {r}" for r in results["refused"])]
    return "\n".join(lines) + "\n"


def write_results(folder: Path, results: dict[str, Any]) -> None:
    """``results.json`` (everything) and ``results.md`` (the table) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    (folder / "results.md").write_text(markdown(results))
