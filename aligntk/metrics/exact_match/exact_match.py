"""Exact match: the fraction of predictions equal to their reference after stripping whitespace.

A local ``evaluate`` module, shipped inside aligntk so that evaluation never needs the
Hugging Face Hub: ``evaluate.load("exact_match")`` fetches the Hub version, which fails
offline. Load it with ``aligntk.load_metric("exact_match")``.
"""

from __future__ import annotations

import datasets
import evaluate

_DESCRIPTION = """
Exact match: the fraction of predictions that equal their reference string once leading
and trailing whitespace is stripped from both. Returns a float in [0, 1]; 0.0 for no
examples.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): predicted texts.
    references (list of str): reference texts, one per prediction.
Returns:
    exact_match (float): the fraction of stripped predictions equal to the stripped reference.
Examples:
    >>> metric = aligntk.load_metric("exact_match")
    >>> metric.compute(predictions=["68", " 7 "], references=["68", "8"])
    {'exact_match': 0.5}
"""

_CITATION = ""


class ExactMatch(evaluate.Metric):
    """String exact match after stripping whitespace at both ends."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        if not predictions:
            # evaluate itself refuses empty inputs; this keeps the function total anyway.
            return {"exact_match": 0.0}
        # Stripping only: a generated answer often ends with a newline or a space before
        # the stop token, which should not count as a wrong answer. Inner text must match.
        hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
        return {"exact_match": hits / len(predictions)}
