"""Per-layer budgets: totals, the pyramid shape, and errors that name the file and the value."""

from __future__ import annotations

import json

import pytest

from kvtrain.policies.budgets import layer_budgets


def test_uniform():
    assert layer_budgets("uniform", 4, 32) == [32, 32, 32, 32]


@pytest.mark.parametrize(("num_layers", "budget"), [(2, 10), (5, 7), (16, 64), (30, 2), (7, 101)])
def test_pyramid_total_shape_and_ends(num_layers, budget):
    out = layer_budgets("pyramid", num_layers, budget)
    assert len(out) == num_layers and all(isinstance(x, int) for x in out)
    assert sum(out) == num_layers * budget
    assert all(a >= b for a, b in zip(out, out[1:]))
    assert min(out) >= 1
    # each layer is within rounding of the linear ramp 1.5x -> 0.5x
    for layer, value in enumerate(out):
        ideal = budget * (1.5 - layer / (num_layers - 1))
        assert abs(value - ideal) < 1.0


def test_pyramid_degenerate_cases_are_uniform():
    assert layer_budgets("pyramid", 1, 9) == [9]
    assert layer_budgets("pyramid", 6, 1) == [1] * 6


def test_list_and_json_file(tmp_path):
    assert layer_budgets([3, 4, 5], 3, 99) == [3, 4, 5]
    path = tmp_path / "budgets.json"
    path.write_text(json.dumps({"budgets": [8, 6, 4]}))
    assert layer_budgets(path, 3, 0) == [8, 6, 4]
    assert layer_budgets(str(path), 3, 0) == [8, 6, 4]


def test_errors_name_file_and_value(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"budgets": [8, 6]}))
    with pytest.raises(ValueError, match=r"b\.json: 2 budgets for 3 layers"):
        layer_budgets(path, 3, 0)
    path.write_text(json.dumps({"budgets": [8, "x", 4]}))
    with pytest.raises(ValueError, match=r"b\.json: budget 'x' of layer 1"):
        layer_budgets(path, 3, 0)
    path.write_text(json.dumps([8, 6, 4]))
    with pytest.raises(ValueError, match=r"b\.json: expected an object"):
        layer_budgets(path, 3, 0)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"b\.json: not valid JSON"):
        layer_budgets(path, 3, 0)
    with pytest.raises(ValueError, match="missing.json"):
        layer_budgets(tmp_path / "missing.json", 3, 0)
    with pytest.raises(ValueError, match="pyramidal"):
        layer_budgets("pyramidal", 3, 4)
    with pytest.raises(ValueError, match="budget 0 of layer 2"):
        layer_budgets([1, 2, 0], 3, 4)
    with pytest.raises(ValueError, match="budget=0"):
        layer_budgets("uniform", 3, 0)
