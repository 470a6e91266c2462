"""``aligntk select``'s work: read rows, score them, choose, write the output folder atomically.

The output folder holds ``kept.jsonl`` (kept rows as read, in file order: any data
component's ``path:`` reads it), ``scores.jsonl`` (``{"row", "where", "score", "kept"}``
per row), ``report.json`` and ``report.md`` (counts, quantiles, the cut) and
``histogram.png`` (the score histogram with the cut marked; skipped, and said so in the
report, when matplotlib is not installed).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from aligntk import DataError, read_rows

from .scoring import (
    Encoded,
    Keys,
    Labelled,
    alone,
    class_log_probs,
    completion_nll,
    confidence,
    encode_labelled,
    encode_row,
    label_loss,
    load_model,
    pad_id,
    perplexity,
    pick_device,
    reward_scores,
)
from .selection import Choice, choose, quantiles
from .spec import SelectSpec


def read_data(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Every ``(where, row)`` of the data file, in file order."""
    return list(read_rows(path))


def encode_all(rows: list[tuple[str, dict[str, Any]]], tokenizer: Any, spec: SelectSpec) -> list[Encoded]:
    """Each row's tokens; a row longer than ``max_length`` is an error naming it."""
    keys = Keys(spec.prompt_key, spec.completion_key, spec.messages_key, spec.text_key)
    out = []
    for where, row in rows:
        enc = encode_row(where, row, tokenizer, keys)
        length = len(enc.prompt_ids) + len(enc.completion_ids)
        if spec.max_length is not None and length > spec.max_length:
            raise DataError(f"{where}: {length} tokens, more than max_length {spec.max_length}")
        out.append(enc)
    return out


def encode_labelled_all(
    rows: list[tuple[str, dict[str, Any]]], tokenizer: Any, num_classes: int, spec: SelectSpec
) -> list[Labelled]:
    """Each classification row's text tokens (and target, for the losses); too long is an error naming it."""
    label_key = None if spec.score == "confidence" else spec.label_key
    out = []
    for where, row in rows:
        enc = encode_labelled(where, row, tokenizer, num_classes, spec.text_key, label_key)
        if spec.max_length is not None and len(enc.input_ids) > spec.max_length:
            raise DataError(f"{where}: {len(enc.input_ids)} tokens, more than max_length {spec.max_length}")
        out.append(enc)
    return out


def score_classified(
    spec: SelectSpec, rows: list[tuple[str, dict[str, Any]]], device: Any
) -> tuple[list[float], dict[str, list[float]]]:
    """Confidence, label loss, or the weak - strong label-loss gap, from sequence classifiers."""
    folders = {"model": spec.model} if spec.model is not None else {"weak": spec.weak, "strong": spec.strong}
    losses: dict[str, list[float]] = {}
    for name, folder in folders.items():
        assert folder is not None
        model, tokenizer = load_model(folder, spec.tokenizer, device, classifier=True)
        encoded = encode_labelled_all(rows, tokenizer, int(model.config.num_labels), spec)
        pad_token = model.config.pad_token_id if model.config.pad_token_id is not None else pad_id(tokenizer)
        logps = class_log_probs(model, encoded, int(pad_token), spec.batch_size)
        del model
        if spec.score == "confidence":
            return confidence(logps), {}
        losses[name] = label_loss(logps, encoded)
    if spec.score == "loss":
        return losses["model"], {}
    parts = {"weak_loss": losses["weak"], "strong_loss": losses["strong"]}
    return [w - s for w, s in zip(parts["weak_loss"], parts["strong_loss"])], parts


def score_rows(spec: SelectSpec, rows: list[tuple[str, dict[str, Any]]]) -> tuple[list[float], dict[str, list[float]]]:
    """``(scores, parts)``: one score per row, and the NLLs or losses it came from (``parts``, per name)."""
    device = pick_device(spec.device)
    if spec.classifier:
        return score_classified(spec, rows, device)
    if spec.score == "learnability":
        assert spec.weak is not None and spec.strong is not None
        parts: dict[str, list[float]] = {}
        for name, folder in (("weak_nll", spec.weak), ("strong_nll", spec.strong)):
            model, tokenizer = load_model(folder, spec.tokenizer, device)
            parts[name] = completion_nll(model, encode_all(rows, tokenizer, spec), pad_id(tokenizer), spec.batch_size)
            del model
        return [w - s for w, s in zip(parts["weak_nll"], parts["strong_nll"])], parts
    assert spec.model is not None
    model, tokenizer = load_model(spec.model, spec.tokenizer, device, reward=spec.score == "reward")
    encoded = encode_all(rows, tokenizer, spec)
    if spec.score == "reward":
        return reward_scores(model, encoded, int(model.config.pad_token_id), spec.batch_size), {}
    nll = completion_nll(model, encoded, pad_id(tokenizer), spec.batch_size)
    if spec.score == "perplexity":
        return [perplexity(x) for x in nll], {"nll": nll}
    nll_alone = completion_nll(model, alone(encoded, tokenizer), pad_id(tokenizer), spec.batch_size)
    return [perplexity(c - a) for c, a in zip(nll, nll_alone)], {"nll": nll, "nll_alone": nll_alone}


def select(spec: SelectSpec) -> dict[str, Any]:
    """Score, choose and write ``spec.out``; return the report (also ``report.json``).

    Raises:
        DataError: ``out`` exists, or a row cannot be read or scored (one line naming it).
    """
    out = Path(spec.out)
    if out.exists():
        raise DataError(f"{out}: the output folder exists; choose another out or remove it")
    started = time.monotonic()
    if spec.threads is not None:
        import torch

        torch.set_num_threads(spec.threads)
    rows = read_data(spec.data)
    scores, parts = score_rows(spec, rows)
    choice = choose(
        scores, keep_top=spec.keep_top, keep_fraction=spec.keep_fraction, threshold=spec.threshold, lowest=spec.lowest
    )
    report = make_report(spec, scores, choice, time.monotonic() - started)
    write_output(out, rows, scores, parts, choice, report, spec.score)
    return report


def make_report(spec: SelectSpec, scores: list[float], choice: Choice, seconds: float) -> dict[str, Any]:
    kept = [s for s, k in zip(scores, choice.kept) if k]
    return {
        "data": str(spec.data),
        "out": str(spec.out),
        "score": spec.score,
        **({"task": "sequence_classification"} if spec.classifier else {}),
        "models": {k: str(getattr(spec, k)) for k in ("model", "weak", "strong") if getattr(spec, k) is not None},
        "rule": choice.rule,
        "keep": "lowest" if spec.lowest else "highest",
        "cut": choice.cut,
        "rows": len(scores),
        "kept": len(kept),
        "quantiles": quantiles(scores),
        "kept_quantiles": quantiles(kept),
        "seconds": round(seconds, 2),
    }


def write_output(
    out: Path,
    rows: list[tuple[str, dict[str, Any]]],
    scores: list[float],
    parts: dict[str, list[float]],
    choice: Choice,
    report: dict[str, Any],
    score_name: str,
) -> None:
    """Write everything in a temporary sibling folder, then rename it to ``out`` (atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with (tmp / "kept.jsonl").open("w", encoding="utf-8") as f:
            for (_, row), keep in zip(rows, choice.kept):
                if keep:
                    f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        with (tmp / "scores.jsonl").open("w", encoding="utf-8") as f:
            for i, ((where, _), score, keep) in enumerate(zip(rows, scores, choice.kept)):
                line = {"row": i, "where": where, "score": _json_float(score), "kept": keep}
                line.update({name: _json_float(values[i]) for name, values in parts.items()})
                f.write(json.dumps(line) + "\n")
        report["histogram"] = _histogram(tmp / "histogram.png", scores, choice, score_name)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(markdown(report), encoding="utf-8")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # JSON has no inf / nan


def _histogram(path: Path, scores: list[float], choice: Choice, score_name: str) -> str | None:
    """Draw the histogram (kept and dropped stacked, the cut a line); ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    finite = [(s, k) for s, k in zip(scores, choice.kept) if math.isfinite(s)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    note = ""
    if finite:
        lo, hi = min(s for s, _ in finite), max(s for s, _ in finite)
        if len(finite) >= 100:  # long tails (IFD has a few huge values) would squash the rest into one bin
            q = quantiles([s for s, _ in finite], (0.01, 0.99))
            if q["p99"] > q["p1"] and (hi - lo) > 3 * (q["p99"] - q["p1"]):
                lo, hi, note = q["p1"], q["p99"], "; 1% tails in the edge bins"
                finite = [(min(max(s, lo), hi), k) for s, k in finite]
        bins = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 10
        ax.hist(
            [[s for s, k in finite if k], [s for s, k in finite if not k]],
            bins=bins, stacked=True, label=["kept", "dropped"], color=["tab:blue", "lightgray"],
        )  # fmt: skip
    if choice.cut is not None and math.isfinite(choice.cut):
        ax.axvline(choice.cut, color="tab:red", linestyle="--", label=f"cut {choice.cut:.4g}")
    ax.set_xlabel(score_name)
    ax.set_ylabel("rows")
    ax.set_title(f"{score_name}: kept {sum(choice.kept)} of {len(scores)} ({choice.rule}{note})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def markdown(report: dict[str, Any]) -> str:
    """``report.md``: what was scored, what was kept, the quantiles of all and of kept rows."""
    cut = report["cut"]
    lines = [
        f"# Selection: {report['score']}",
        "",
        f"- data: `{report['data']}`",
        *(f"- {role}: `{path}`" for role, path in report["models"].items()),
        f"- rule: {report['rule']} (keep the {report['keep']} scores)",
        f"- cut: {cut:.6g}" if isinstance(cut, float) and math.isfinite(cut) else f"- cut: {cut}",
        f"- kept: {report['kept']} of {report['rows']} rows",
        f"- time: {report['seconds']} s",
        "",
        "| quantile | all rows | kept rows |",
        "| --- | --- | --- |",
    ]
    for q, value in report["quantiles"].items():
        kept = report["kept_quantiles"].get(q)
        lines.append(f"| {q} | {value:.6g} | {'' if kept is None else f'{kept:.6g}'} |")
    lines.append("")
    lines.append("![histogram](histogram.png)" if report.get("histogram") else "(no histogram: matplotlib is not installed)")
    return "\n".join(lines) + "\n"
