"""Per-layer KV budgets: uniform, PyramidKV-style, an explicit list, or a head-budgets file from calibration."""

from __future__ import annotations

import math
from pathlib import Path

from kvtrain.artifacts.head_budgets import check_budgets, read_head_budgets

KINDS = ("uniform", "pyramid")


def layer_budgets(kind: str | list[int] | Path, num_layers: int, budget: int) -> list[int]:
    """Token budget of each layer, a list of ``num_layers`` ints >= 1.

    - ``"uniform"``: ``budget`` everywhere.
    - ``"pyramid"``: a linear decrease from ``1.5 * budget`` (layer 0) to ``0.5 * budget`` (last layer),
      ``raw_l = budget * (1.5 - l / (num_layers - 1))``, whose mean is exactly ``budget``; rounded by largest
      remainder (ties to the lower layer) so the total is exactly ``num_layers * budget``. Every layer gets
      at least ``0.5 * budget >= 1`` tokens when ``budget >= 2``; ``budget == 1`` can only be uniform.
    - a list of ints, or a ``Path`` / any other string naming a JSON file ``{"budgets": [...]}``: used as
      given (``budget`` is ignored); the length must equal ``num_layers``.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    if isinstance(kind, list):
        return check_budgets(kind, num_layers, "budget list")
    if isinstance(kind, str) and kind in KINDS:
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget={budget!r} must be an int >= 1")
        if kind == "uniform" or num_layers == 1 or budget == 1:
            return [budget] * num_layers
        return _pyramid(num_layers, budget)
    if not isinstance(kind, (str, Path)):
        raise ValueError(f"budget kind {kind!r} must be one of {KINDS}, a list of ints or a JSON file path")
    path = Path(kind)
    if not path.is_file():
        raise ValueError(f"budget kind {str(path)!r} is neither one of {KINDS} nor an existing JSON file")
    return read_head_budgets(path, num_layers)


def _pyramid(num_layers: int, budget: int) -> list[int]:
    raw = [budget * (1.5 - layer / (num_layers - 1)) for layer in range(num_layers)]
    out = [math.floor(r) for r in raw]
    short = num_layers * budget - sum(out)
    by_fraction = sorted(range(num_layers), key=lambda layer: (-(raw[layer] - out[layer]), layer))
    for layer in by_fraction[:short]:
        out[layer] += 1
    return out
