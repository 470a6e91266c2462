"""Which rows to keep given their scores: top-k, a fraction, or a threshold."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    """The rows kept (``kept[i]`` for row ``i``), the cut score and how it was chosen.

    ``cut`` is the threshold given, or for top-k and fraction the score of the last row
    kept (``None`` when nothing is kept).
    """

    kept: list[bool]
    cut: float | None
    rule: str


def choose(
    scores: Sequence[float],
    *,
    keep_top: int | None = None,
    keep_fraction: float | None = None,
    threshold: float | None = None,
    lowest: bool = False,
) -> Choice:
    """Keep the ``keep_top`` best rows, the best ``keep_fraction`` of them, or those at the threshold or better.

    "Best" is the highest score (``lowest``: the lowest). Ties at the cut of a top-k go to
    the earlier row, so the choice is deterministic. A NaN score is never kept. A fraction
    keeps ``round(fraction * rows)`` rows, at least one.
    """
    n = len(scores)
    sign = 1.0 if lowest else -1.0
    finite = [i for i in range(n) if not math.isnan(scores[i])]
    if threshold is not None:
        kept = [not math.isnan(s) and (s <= threshold if lowest else s >= threshold) for s in scores]
        rule = f"score {'<=' if lowest else '>='} {threshold:g}"
        return Choice(kept, threshold, rule)
    if keep_top is not None:
        k, rule = keep_top, f"{'lowest' if lowest else 'top'} {keep_top}"
    else:
        assert keep_fraction is not None
        k = max(1, round(keep_fraction * n))
        rule = f"{'lowest' if lowest else 'top'} fraction {keep_fraction:g} ({k} rows)"
    order = sorted(finite, key=lambda i: (sign * scores[i], i))[: min(k, len(finite))]
    chosen = set(order)
    cut = scores[order[-1]] if order else None
    return Choice([i in chosen for i in range(n)], cut, rule)


def quantiles(scores: Sequence[float], qs: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)) -> dict[str, float]:
    """Linear-interpolation quantiles of the non-NaN scores (``{"p50": ...}``); empty if none."""
    values = sorted(s for s in scores if not math.isnan(s))
    if not values:
        return {}
    out = {}
    for q in qs:
        pos = q * (len(values) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        value = values[lo] + (values[hi] - values[lo]) * (pos - lo) if hi != lo else values[lo]
        out[f"p{round(q * 100)}"] = value
    return out
