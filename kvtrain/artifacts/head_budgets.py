"""``head_budgets.json``: per-layer cache budgets calibrated from measured head behaviour.

``{"budgets": [b_0, ..., b_{L-1}], ...}``: one positive token budget per layer; calibration also records how
they were derived (per-head scores, the rule), which readers ignore.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvtrain.io import read_checked_json, write_checked_json

HEAD_BUDGETS = "head_budgets.json"


def write_head_budgets(path: Path, data: dict[str, Any]) -> None:
    check_budgets(data.get("budgets"), len(data.get("budgets") or []), str(path))
    write_checked_json(path, data)


def read_head_budgets(path: Path, num_layers: int) -> list[int]:
    """The per-layer budgets of a head-budgets file, checked against the model's `num_layers`."""
    if not path.is_file():
        raise ValueError(f"{path}: no such head-budgets file")
    data = read_checked_json(path, "head-budgets file")
    if not isinstance(data, dict) or "budgets" not in data:
        raise ValueError(f'{path}: expected an object {{"budgets": [...]}}, got {str(data)[:80]!r}')
    if not isinstance(data["budgets"], list):
        raise ValueError(f"{path}: 'budgets' must be a list, got {data['budgets']!r}")
    return check_budgets(data["budgets"], num_layers, str(path))


def check_budgets(budgets: Any, num_layers: int, source: str) -> list[int]:
    """`budgets` as a list of `num_layers` ints >= 1, or a ValueError naming `source` and the layer."""
    if not isinstance(budgets, list) or len(budgets) != num_layers:
        count = len(budgets) if isinstance(budgets, list) else budgets
        raise ValueError(f"{source}: {count} budgets for {num_layers} layers")
    for layer, value in enumerate(budgets):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{source}: budget {value!r} of layer {layer} must be an int >= 1")
    return list(budgets)
