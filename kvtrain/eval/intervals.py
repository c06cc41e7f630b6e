"""95% intervals over items, and paired differences between two arms scored on the same items (pure Python).

* a proportion (pass/fail scores): the Wilson score interval;
* a mean of other scores: the percentile bootstrap over items (seeded, so a report is reproducible);
* a difference between two arms on the same items: the paired bootstrap (items resampled together, so what
  both arms share cancels), called real only when its interval excludes 0.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from kvtrain.eval.metrics import finite

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_SAMPLES = 2000


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion `successes / n`."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson: need 0 <= successes <= n and n >= 1, got {successes}/{n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _percentiles(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    last = len(values) - 1
    return values[round(0.025 * last)], values[round(0.975 * last)]


def bootstrap_mean(scores: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `scores` (items resampled with replacement)."""
    scores = [finite(s, "score") for s in scores]
    if not scores:
        raise ValueError("bootstrap of no scores")
    rng = random.Random(seed)
    n = len(scores)
    return _percentiles([sum(rng.choices(scores, k=n)) / n for _ in range(samples)])


def interval(scores: Sequence[float]) -> tuple[float, float, str]:
    """(low, high, method) of the mean of `scores`: Wilson when every score is 0 or 1, else the bootstrap."""
    scores = [finite(s, "score") for s in scores]
    if scores and all(s in (0.0, 1.0) for s in scores):
        return (*wilson(int(sum(scores)), len(scores)), "wilson")
    return (*bootstrap_mean(scores), "bootstrap")


def paired_difference(a: Sequence[float], b: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = 0) -> dict[str, float | bool]:
    """Mean of a - b over paired items with its paired-bootstrap 95% interval; `real` when it excludes 0."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired difference needs equally many paired scores, got {len(a)} and {len(b)}")
    diffs = [finite(x, "score") - finite(y, "score") for x, y in zip(a, b)]
    low, high = bootstrap_mean(diffs, samples=samples, seed=seed)
    return {"difference": sum(diffs) / len(diffs), "low": low, "high": high, "real": low > 0 or high < 0}
