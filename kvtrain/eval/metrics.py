"""Aggregate metrics over item scores and over sweep cells (pure Python: no torch).

A NaN or infinite input is an error here, never a metric: every function checks what it aggregates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence


class NonFiniteMetricError(ValueError):
    """A metric was about to be computed from NaN or infinity."""


def finite(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise NonFiniteMetricError(f"{what} is {value}: a metric cannot be computed from a non-finite value")
    return value


def mean(values: Iterable[float], what: str = "values") -> float:
    values = [finite(v, what) for v in values]
    if not values:
        raise ValueError(f"mean of no {what}")
    return sum(values) / len(values)


def accuracy_where_reference_right(scores: Sequence[float], reference_scores: Sequence[float]) -> float | None:
    """Mean score over the items the reference (the full-cache model) gets fully right (score 1).

    Items the full cache fails tell nothing about compression. None when the reference gets no item right.
    """
    if len(scores) != len(reference_scores):
        raise ValueError(f"{len(scores)} scores but {len(reference_scores)} reference scores")
    kept = [finite(s, "score") for s, r in zip(scores, reference_scores) if finite(r, "reference score") == 1.0]
    return sum(kept) / len(kept) if kept else None


def agreement(predictions: Sequence[str], reference_predictions: Sequence[str]) -> float:
    """EffiVLM-Bench loyalty: the fraction of predictions identical to the reference model's."""
    if len(predictions) != len(reference_predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(reference_predictions)} reference predictions")
    if not predictions:
        raise ValueError("agreement of no predictions")
    return sum(p == r for p, r in zip(predictions, reference_predictions)) / len(predictions)


def overall_performance(ratios: Mapping[str, float]) -> float:
    """EffiVLM-Bench overall performance: the quadratic mean over benchmarks of score / uncompressed score."""
    if not ratios:
        raise ValueError("overall performance of no benchmark")
    return math.sqrt(mean((finite(r, f"ratio of {name}") ** 2 for name, r in ratios.items()), "ratios"))


def score_ratio(score: float, reference: float) -> float | None:
    """score / reference score for a higher-is-better metric; None when the reference score is 0."""
    score, reference = finite(score, "score"), finite(reference, "reference score")
    return None if reference == 0 else score / reference


def gap_closed(full: float, base: float, trained: float) -> float | None:
    """The fraction of the full-cache-minus-compressed gap that training closes: (trained - base) / (full - base).

    1 means training reached the full cache, 0 no change, negative worse than before. None when there is no
    gap (base already scores what the full cache scores).
    """
    full, base, trained = finite(full, "full-cache score"), finite(base, "base score"), finite(trained, "trained score")
    if full == base:
        return None
    return (trained - base) / (full - base)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, quality) that no other point beats: none has cost <= and quality >= with
    one of them strict. Lower cost and higher quality are better; indices sorted by cost."""
    checked = [(finite(c, "cost"), finite(q, "quality")) for c, q in points]
    front = []
    for i, (c, q) in enumerate(checked):
        dominated = any((c2 <= c and q2 >= q) and (c2 < c or q2 > q) for j, (c2, q2) in enumerate(checked) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (checked[i][0], -checked[i][1]))
