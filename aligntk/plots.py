"""PNG plots of a benchmark suite: training loss and each evaluation metric, per variant.

Seeds are thin lines, their mean a thick one. Evaluation curves are drawn against total
optimizer steps (a variant that starts from another's model begins where its parent
ended), so equal budgets line up on the x axis.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_suite(out_dir: Path, records: Sequence[Any], metrics: Sequence[str] | None = None) -> list[str]:
    """Write ``train_loss.png`` and ``<metric>.png`` per evaluation metric (``metrics``, default all).

    Returns the file names written.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    done = [r for r in records if r.status == "ok" and r.curves]
    if not done:
        return []
    variants = list(dict.fromkeys(r.variant for r in done))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(variants)}
    written = []

    # Training loss: one panel per variant, since losses of different methods differ in scale.
    cols = min(3, len(variants))
    rows = math.ceil(len(variants) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, variants):
        _lines(ax, [r.curves.get("loss", []) for r in done if r.variant == name], colors[name], name)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
    for ax in list(axes.flat)[len(variants) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_dir / "train_loss.png", dpi=110)
    plt.close(fig)
    written.append("train_loss.png")

    offsets = {(r.variant, r.seed): r.total_steps - r.steps for r in done}
    found = list(dict.fromkeys(k for r in done for k in r.curves if k != "loss"))
    for metric in [m for m in found if m in metrics] if metrics else found:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for name in variants:
            curves = [
                [[step + offsets[r.variant, r.seed], value] for step, value in r.curves.get(metric, [])]
                for r in done
                if r.variant == name
            ]
            _lines(ax, curves, colors[name], name)
        ax.set_xlabel("total optimizer steps (parents' steps included)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} during training")
        ax.legend(fontsize="small")
        fig.tight_layout()
        filename = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', metric)}.png"
        fig.savefig(out_dir / filename, dpi=110)
        plt.close(fig)
        written.append(filename)
    return written


def _lines(ax: Any, curves: list[list[list[float]]], color: Any, label: str) -> None:
    """Each seed thin; the mean over seeds (at the steps they share) thick, labelled."""
    curves = [c for c in curves if c]
    if not curves:
        return
    for curve in curves:
        ax.plot([p[0] for p in curve], [p[1] for p in curve], color=color, alpha=0.3, linewidth=0.8)
    shared = sorted(set.intersection(*({p[0] for p in c} for c in curves)))
    if shared:
        by_step = [dict((p[0], p[1]) for p in c) for c in curves]
        mean = [sum(d[s] for d in by_step) / len(by_step) for s in shared]
        ax.plot(shared, mean, color=color, linewidth=2.0, marker="o" if len(shared) < 12 else None, label=label)
