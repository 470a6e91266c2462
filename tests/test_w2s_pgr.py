"""The PGR metric: the formula by hand, accumulation over batches, and the degenerate case."""

from __future__ import annotations

import math

import pytest

from aligntk_w2s.metrics import available_metrics, load_metric


def test_pgr_is_shipped() -> None:
    assert "pgr" in available_metrics()


def test_pgr_by_hand() -> None:
    # 5 examples: weak right on 2 (0.4), w2s on 3 (0.6), ceiling on 5 (1.0).
    references = [0, 1, 1, 0, 1]
    result = load_metric("pgr").compute(
        references=references,
        weak_predictions=[0, 0, 0, 1, 1],
        w2s_predictions=[0, 1, 0, 1, 1],
        ceiling_predictions=[0, 1, 1, 0, 1],
    )
    assert math.isclose(result["weak_acc"], 0.4)
    assert math.isclose(result["w2s_acc"], 0.6)
    assert math.isclose(result["ceiling_acc"], 1.0)
    assert math.isclose(result["pgr"], (0.6 - 0.4) / (1.0 - 0.4))


def test_pgr_can_be_negative_or_above_one() -> None:
    metric = load_metric("pgr")
    worse = metric.compute(
        references=[1, 1, 1, 1],
        weak_predictions=[1, 1, 0, 0],
        w2s_predictions=[1, 0, 0, 0],
        ceiling_predictions=[1, 1, 1, 0],
    )
    assert math.isclose(worse["pgr"], (0.25 - 0.5) / (0.75 - 0.5))
    better = metric.compute(
        references=[1, 1, 1, 1],
        weak_predictions=[1, 1, 0, 0],
        w2s_predictions=[1, 1, 1, 1],
        ceiling_predictions=[1, 1, 1, 0],
    )
    assert math.isclose(better["pgr"], 2.0)


def test_pgr_accumulates_batches() -> None:
    metric = load_metric("pgr")
    metric.add_batch(references=[2, 0], weak_predictions=[2, 1], w2s_predictions=[2, 0], ceiling_predictions=[2, 0])
    metric.add_batch(references=[1, 1], weak_predictions=[0, 0], w2s_predictions=[0, 1], ceiling_predictions=[1, 1])
    result = metric.compute()
    assert math.isclose(result["pgr"], (0.75 - 0.25) / (1.0 - 0.25))


@pytest.mark.parametrize("ceiling", [[1, 1, 0, 0], [1, 0, 0, 0]])
def test_pgr_refuses_a_ceiling_that_does_not_beat_the_weak_model(ceiling: list[int]) -> None:
    with pytest.raises(ValueError, match="does not beat the weak"):
        load_metric("pgr").compute(
            references=[1, 1, 1, 1],
            weak_predictions=[1, 1, 0, 0],
            w2s_predictions=[1, 1, 1, 0],
            ceiling_predictions=ceiling,
        )


def test_pgr_refuses_lists_of_different_lengths() -> None:
    with pytest.raises(ValueError):
        load_metric("pgr").compute(
            references=[1, 1], weak_predictions=[1], w2s_predictions=[1, 1], ceiling_predictions=[1, 1]
        )
