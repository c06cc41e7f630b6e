"""Aggregate metrics on hand-made numbers with hand-computed values; NaN is an error, never a metric."""

from __future__ import annotations

import math

import pytest

from kvtrain.eval import metrics as M


def test_mean_and_nan():
    assert M.mean([1.0, 0.0, 0.5]) == 0.5
    with pytest.raises(M.NonFiniteMetricError, match="nan"):
        M.mean([1.0, math.nan])
    with pytest.raises(ValueError, match="mean of no"):
        M.mean([])


def test_accuracy_where_the_full_cache_is_right():
    # the full cache gets items 0 and 2 right; the compressed model scores 1 and 0 on them: 0.5
    assert M.accuracy_where_reference_right([1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]) == 0.5
    assert M.accuracy_where_reference_right([1.0], [0.0]) is None  # nothing to compare on
    with pytest.raises(M.NonFiniteMetricError):
        M.accuracy_where_reference_right([math.nan], [1.0])


def test_agreement_is_the_share_of_identical_predictions():
    assert M.agreement(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == 0.5
    with pytest.raises(ValueError, match="2 predictions but 1"):
        M.agreement(["a", "b"], ["a"])


def test_overall_performance_is_a_quadratic_mean_of_ratios():
    # sqrt((0.6^2 + 0.8^2) / 2) = sqrt(0.5)
    assert M.overall_performance({"a": 0.6, "b": 0.8}) == pytest.approx(math.sqrt(0.5))
    with pytest.raises(M.NonFiniteMetricError, match="ratio of b"):
        M.overall_performance({"a": 0.6, "b": math.inf})


def test_score_ratio_and_gap_closed():
    assert M.score_ratio(0.3, 0.6) == 0.5
    assert M.score_ratio(0.3, 0.0) is None
    # full 0.9, base 0.5, trained 0.7: (0.7 - 0.5) / (0.9 - 0.5) = 0.5
    assert M.gap_closed(0.9, 0.5, 0.7) == pytest.approx(0.5)
    assert M.gap_closed(0.9, 0.5, 0.4) == pytest.approx(-0.25)  # training made it worse
    assert M.gap_closed(0.9, 0.9, 0.7) is None  # no gap to close
    with pytest.raises(M.NonFiniteMetricError, match="trained score"):
        M.gap_closed(0.9, 0.5, math.nan)


def test_pareto_front():
    # (cost, quality): (1, 0.9) full; (0.5, 0.8) and (0.25, 0.6) on the front; (0.5, 0.7) dominated by
    # (0.5, 0.8); (0.6, 0.5) dominated by both front points with lower cost
    points = [(1.0, 0.9), (0.5, 0.8), (0.5, 0.7), (0.25, 0.6), (0.6, 0.5)]
    assert M.pareto_front(points) == [3, 1, 0]
    assert M.pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]  # equal points do not dominate each other
