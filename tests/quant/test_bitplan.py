"""Bit plans: exact solver against brute force over every assignment, greedy feasibility, plan files."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from kvtrain.io import DIGEST_KEY
from kvtrain.artifacts.quant_plan import (
    CANDIDATE_BITS,
    Budget,
    QuantPlan,
    QuantPlanError,
    read_quant_plan,
    write_quant_plan,
)
from kvtrain.quant.bitplan import exact_bits, greedy_bits, layer_costs, plan_bits
from kvtrain.quant.tada import bytes_per_token


def _sensitivity(gen: torch.Generator, layers: int) -> list[dict[int, float]]:
    out = []
    for _ in range(layers):
        kl = (torch.rand(3, generator=gen, dtype=torch.float64) * 2).sort(descending=True).values.tolist()
        out.append(dict(zip(CANDIDATE_BITS, kl)))  # usually fewer bits -> larger KL, not always convex
    return out


def _brute_force(sens, costs, budget):
    best = None
    for bits in itertools.product(CANDIDATE_BITS, repeat=len(sens)):
        if sum(c[b] for c, b in zip(costs, bits)) <= budget + 1e-9:
            err = sum(s[b] for s, b in zip(sens, bits))
            best = err if best is None else min(best, err)
    return best


@pytest.mark.parametrize("kind", ["average_bits", "bytes_per_token"])
def test_exact_matches_brute_force_and_greedy_is_feasible(kind: str):
    gen = torch.Generator().manual_seed(0)
    for layers in range(1, 6):
        for _ in range(6):
            sens = _sensitivity(gen, layers)
            if kind == "average_bits":
                costs = [{b: float(b) for b in CANDIDATE_BITS}] * layers
                budgets = [avg * layers for avg in (2, 2.5, 3, 4, 5.2, 8)]
            else:
                costs = [{b: float(bytes_per_token(2, 16, b, b, 8)) for b in CANDIDATE_BITS}] * layers
                budgets = [costs[0][2] * layers + extra for extra in (0, 40, 100, 300, 1000)]
            for budget in budgets:
                best = _brute_force(sens, costs, budget)
                exact = exact_bits(sens, costs, budget)
                assert sum(c[b] for c, b in zip(costs, exact)) <= budget + 1e-9
                assert sum(s[b] for s, b in zip(sens, exact)) == pytest.approx(best, abs=1e-12)
                greedy = greedy_bits(sens, costs, budget)
                assert sum(c[b] for c, b in zip(costs, greedy)) <= budget + 1e-9
                assert sum(s[b] for s, b in zip(sens, greedy)) >= best - 1e-12


def test_layer_costs_use_the_tada_byte_formula():
    costs, total = layer_costs(Budget("bytes_per_token", 5000.0), 3, 8, 128, 32)
    assert total == 5000.0
    assert costs[2][4] == bytes_per_token(8, 128, 4, 4, 32)
    costs, total = layer_costs(Budget("average_bits", 3.0), 4, 8, 128, 32)
    assert total == 12.0 and costs[0] == {2: 2.0, 4: 4.0, 8: 8.0}


def test_infeasible_and_malformed_inputs():
    sens = [{2: 1.0, 4: 0.5, 8: 0.1}] * 2
    costs = [{2: 2.0, 4: 4.0, 8: 8.0}] * 2
    for solve in (exact_bits, greedy_bits):
        with pytest.raises(ValueError, match="below the cheapest plan"):
            solve(sens, costs, 3.0)
    with pytest.raises(ValueError, match=r"sensitivity\[1\] has bits \[2, 4\]"):
        exact_bits([sens[0], {2: 1.0, 4: 0.5}], costs, 10.0)
    with pytest.raises(ValueError, match=r"sensitivity\[0\]\[4\]=nan"):
        exact_bits([{2: 1.0, 4: float("nan"), 8: 0.0}, sens[1]], costs, 10.0)


def test_plan_file_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(1)
    sens = _sensitivity(gen, 6)
    plan = plan_bits(sens, Budget("average_bits", 4.0), num_kv_heads=2, head_dim=16, group_size=8,
                     residual_length=32)
    assert sum(plan.bits) <= 24
    path = tmp_path / "quant_plan.json"
    write_quant_plan(path, plan)
    assert read_quant_plan(path) == plan
    assert json.loads(path.read_text())["schema_version"] == 1


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda d: d["bits"].__setitem__(1, 3), "bits[1]"),
        (lambda d: d.__setitem__("schema_version", 2), "schema_version"),
        (lambda d: d.__setitem__("group_size", 0), "group_size"),
        (lambda d: d.__setitem__("residual_length", -1), "residual_length"),
        (lambda d: d["budget"].__setitem__("kind", "tokens"), "budget.kind"),
        (lambda d: d["budget"].__setitem__("value", -2), "budget.value"),
        (lambda d: d["budget"].__setitem__("value", 2.5), "bits"),  # average of the plan above the budget
        (lambda d: d.__setitem__("extra", 1), "extra"),
        (lambda d: d.pop("bits"), "bits"),
    ],
)
def test_plan_file_errors_name_file_and_field(tmp_path, edit, field):
    plan = QuantPlan([2, 4, 8], group_size=8, residual_length=16, budget=Budget("average_bits", 5.0))
    path = tmp_path / "quant_plan.json"
    write_quant_plan(path, plan)
    data = json.loads(path.read_text())
    del data[DIGEST_KEY]  # a plan written by hand carries no digest: its fields are what is checked
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(QuantPlanError) as err:
        read_quant_plan(path)
    assert str(path) in str(err.value) and repr(field)[1:-1] in str(err.value)


def test_a_written_plan_edited_afterwards_is_refused(tmp_path):
    path = tmp_path / "quant_plan.json"
    write_quant_plan(path, QuantPlan([2, 4, 8], group_size=8, residual_length=16, budget=Budget("average_bits", 5.0)))
    path.write_text(path.read_text().replace('"bits": [\n    2,', '"bits": [\n    4,'))
    with pytest.raises(QuantPlanError, match=r"quant_plan.json: its content does not match the sha256 recorded"):
        read_quant_plan(path)
    path.write_text(path.read_text()[:40])
    with pytest.raises(QuantPlanError, match=r"quant_plan.json: not valid JSON .*damaged or truncated"):
        read_quant_plan(path)


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "quant_plan.json"
    path.write_text("{not json")
    with pytest.raises(QuantPlanError, match="quant_plan.json: not valid JSON"):
        read_quant_plan(path)
