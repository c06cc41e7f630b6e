"""Per-layer KV token budgets from measured head behaviour (docs/methods.md#head-budgets).

What is measured, per query head, on the calibration blocks (full attention of a plain forward):

* **copy** (surface memorisation / retrieval): at a *copy event* the query at position t predicts a token
  ``x[t+1]`` that can be copied from context, i.e. the bigram ``(x[t], x[t+1])`` already occurred at
  ``(j-1, j)`` for some ``1 <= j <= t``. The head's copy score is its attention mass on those source
  positions j, averaged over all copy events (in [0, 1]; 0 when the data has no copy event).
* **spread**: the attention entropy of the query at t divided by ``log(t+1)`` (the entropy of uniform
  attention over the visible keys), averaged over the queries t = k, 2k, 3k, ... with k = ``entropy_stride``
  (default 4; in [0, 1]; ~0 for sink/previous-token heads).

Head importance is ``beta * copy + (1 - beta) * spread``: a head that retrieves arbitrary earlier tokens,
or that spreads its attention widely, loses more when tokens are evicted. A layer's score is the mean over
its heads. Budgets keep the total ``num_layers * budget``: every layer gets a floor of
``ceil(floor_fraction * budget)`` and the rest is shared in proportion to the layer scores, rounded by
largest remainder (ties to the lower layer).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

DEFINITION = (
    "copy: mean attention mass on copy sources j (bigram (x[j-1], x[j]) == (x[t], x[t+1]), 1 <= j <= t) over copy "
    "events; spread: mean attention entropy / log(t+1) over queries t = k, 2k, ... (k = head_entropy_stride); importance = beta*copy + "
    "(1-beta)*spread; layer score = mean importance over its query heads; budget_l = floor + share of the rest "
    "proportional to the layer score (largest-remainder rounding), total = num_layers * budget"
)


def budgets_from_scores(scores: list[float], budget: int, floor_fraction: float) -> list[int]:
    """Integer budgets ``>= ceil(floor_fraction * budget)`` summing to ``len(scores) * budget``.

    The part above the floor is proportional to ``scores`` (non-negative); all-zero scores give uniform budgets.
    """
    if not scores:
        raise ValueError("scores must list at least one layer")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget={budget!r} must be a positive integer")
    if not 0 <= floor_fraction <= 1:
        raise ValueError(f"floor_fraction={floor_fraction} must be in [0, 1]")
    if any(not (math.isfinite(s) and s >= 0) for s in scores):
        raise ValueError(f"scores must be finite and non-negative, got {scores}")
    n = len(scores)
    floor = max(1, math.ceil(floor_fraction * budget))
    rest = n * budget - n * floor
    total_score = sum(scores)
    weights = [s / total_score for s in scores] if total_score > 0 else [1.0 / n] * n
    raw = [floor + rest * w for w in weights]
    out = [math.floor(r) for r in raw]
    by_fraction = sorted(range(n), key=lambda i: (-(raw[i] - out[i]), i))
    for i in by_fraction[: n * budget - sum(out)]:
        out[i] += 1
    return out


def head_budgets(
    copy: Tensor, spread: Tensor, copy_events: Tensor, budget: int, floor_fraction: float, beta: float
) -> dict[str, Any]:
    """The ``head_budgets.json`` content from per-head ``copy`` / ``spread`` ``[L, h_q]`` and events ``[L]``.

    ``budgets`` is the per-layer list `kvtrain.policies.budgets.layer_budgets` reads; ``heads`` holds the
    per-head scores it was derived from.
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    importance = beta * copy + (1 - beta) * spread
    layer_scores = importance.mean(dim=1).tolist()
    return {
        "budgets": budgets_from_scores(layer_scores, budget, floor_fraction),
        "heads": {
            "copy": copy.tolist(),
            "spread": spread.tolist(),
            "importance": importance.tolist(),
            "copy_events": copy_events.tolist(),
        },
        "layer_scores": layer_scores,
        "budget": budget,
        "floor_fraction": floor_fraction,
        "beta": beta,
        "definition": DEFINITION,
    }
