"""Performance gap recovered (PGR), the weak-to-strong score of Burns et al. 2023.

A local ``evaluate`` module, shipped inside the weak-to-strong plugin so that evaluation
never needs the Hugging Face Hub. Load it with ``aligntk_w2s.metrics.load_metric("pgr")``.
"""

from __future__ import annotations

import datasets
import evaluate

_DESCRIPTION = """
Performance gap recovered (Burns et al. 2023, https://arxiv.org/abs/2312.09390):

    PGR = (acc_w2s - acc_weak) / (acc_ceiling - acc_weak)

where acc_weak is the weak supervisor's accuracy, acc_w2s that of the strong model trained
on the weak supervisor's labels, and acc_ceiling that of the strong model trained on the
ground truth. PGR is 0 when the strong student does no better than its supervisor and 1
when it closes the whole gap to the ceiling; it can fall outside [0, 1].

The inputs are one row per evaluation example: the true class and the class each of the
three models predicts for it, so the three accuracies are measured on the same examples.
"""

_KWARGS_DESCRIPTION = """
Args:
    references (list of int): the true class of each example.
    weak_predictions (list of int): the weak supervisor's predicted class.
    w2s_predictions (list of int): the weak-to-strong student's predicted class.
    ceiling_predictions (list of int): the predicted class of the strong model trained on
        ground truth.
Returns:
    pgr (float): the performance gap recovered.
    weak_acc, w2s_acc, ceiling_acc (float): the three accuracies.
Raises:
    ValueError: the ceiling does not beat the weak model (PGR undefined), or the lists
        have different lengths or are empty.
Examples:
    >>> metric = aligntk_w2s.metrics.load_metric("pgr")
    >>> metric.compute(references=[1, 0, 1, 1], weak_predictions=[1, 1, 0, 1],
    ...                w2s_predictions=[1, 0, 0, 1], ceiling_predictions=[1, 0, 1, 1])
    {'pgr': 0.5, 'weak_acc': 0.5, 'w2s_acc': 0.75, 'ceiling_acc': 1.0}
"""

_CITATION = """
@article{burns2023weak,
  title={Weak-to-Strong Generalization: Eliciting Strong Capabilities With Weak Supervision},
  author={Burns, Collin and others},
  journal={arXiv preprint arXiv:2312.09390},
  year={2023}
}
"""

_INPUTS = ("references", "weak_predictions", "w2s_predictions", "ceiling_predictions")


def performance_gap_recovered(weak_acc: float, w2s_acc: float, ceiling_acc: float) -> float:
    """``(w2s_acc - weak_acc) / (ceiling_acc - weak_acc)``.

    Raises:
        ValueError: ``ceiling_acc <= weak_acc``: there is no gap to recover.
    """
    if not ceiling_acc > weak_acc:
        raise ValueError(
            f"PGR is undefined: the ceiling accuracy ({ceiling_acc:.4g}) does not beat the weak "
            f"model's ({weak_acc:.4g}); the weak-to-strong setup has no gap to recover"
        )
    return (w2s_acc - weak_acc) / (ceiling_acc - weak_acc)


def _accuracy(predictions: list[int], references: list[int]) -> float:
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


class PGR(evaluate.Metric):
    """Performance gap recovered from the predictions of the weak, w2s and ceiling models."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({name: datasets.Value("int64") for name in _INPUTS}),
        )

    def _compute(
        self,
        references: list[int],
        weak_predictions: list[int],
        w2s_predictions: list[int],
        ceiling_predictions: list[int],
    ) -> dict[str, float]:
        lengths = {len(references), len(weak_predictions), len(w2s_predictions), len(ceiling_predictions)}
        if len(lengths) != 1:
            raise ValueError(f"the four input lists must have the same length, got lengths {sorted(lengths)}")
        if not references:
            raise ValueError("PGR needs at least one example")
        weak = _accuracy(weak_predictions, references)
        w2s = _accuracy(w2s_predictions, references)
        ceiling = _accuracy(ceiling_predictions, references)
        return {
            "pgr": performance_gap_recovered(weak, w2s, ceiling),
            "weak_acc": weak,
            "w2s_acc": w2s,
            "ceiling_acc": ceiling,
        }
