"""Per-layer TaDA bit-widths under a memory budget, and the ``quant_plan.json`` file that records them.

Input: ``sensitivity[l][b]``, the output KL measured when layer l alone is quantised at b bits. The plan
minimises the summed sensitivity (layers are assumed to add up) subject to ``sum_l cost[l][b_l] <= budget``,
a multiple-choice knapsack. `exact_bits` solves it exactly by dynamic programming over the Pareto frontier
of (cost, error) partial plans; `greedy_bits` upgrades the layer with the best KL reduction per extra
byte until nothing fits (fast, not always optimal).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtrain.io import atomic_write_text
from kvtrain.quant.tada import bytes_per_token

SCHEMA_VERSION = 1
CANDIDATE_BITS = (2, 4, 8)
BUDGET_KINDS = ("average_bits", "bytes_per_token")


class QuantPlanError(ValueError):
    """A quant plan value is invalid; the message names the file (or source) and the field."""


@dataclass(frozen=True)
class Budget:
    """``average_bits``: mean bit-width over layers; ``bytes_per_token``: summed TaDA bytes over layers."""

    kind: str
    value: float


@dataclass
class QuantPlan:
    bits: list[int]  # one bit-width per layer, keys and values alike
    group_size: int
    residual_length: int
    budget: Budget
    schema_version: int = SCHEMA_VERSION


def _check_inputs(sensitivity: Sequence[Mapping[int, float]], costs: Sequence[Mapping[int, float]]) -> None:
    if not sensitivity:
        raise ValueError("sensitivity must list at least one layer")
    if len(costs) != len(sensitivity):
        raise ValueError(f"costs has {len(costs)} layers, sensitivity has {len(sensitivity)}")
    for l, (sens, cost) in enumerate(zip(sensitivity, costs)):
        for name, table in (("sensitivity", sens), ("costs", cost)):
            if set(table) != set(CANDIDATE_BITS):
                raise ValueError(f"{name}[{l}] has bits {sorted(table)}, expected exactly {CANDIDATE_BITS}")
            for b, v in table.items():
                if not (math.isfinite(v) and v >= 0):
                    raise ValueError(f"{name}[{l}][{b}]={v} must be finite and non-negative")


def _infeasible(costs: Sequence[Mapping[int, float]], budget: float) -> ValueError:
    cheapest = sum(min(c.values()) for c in costs)
    return ValueError(f"budget={budget} is below the cheapest plan's cost {cheapest}")


def exact_bits(
    sensitivity: Sequence[Mapping[int, float]], costs: Sequence[Mapping[int, float]], budget: float
) -> list[int]:
    """The bits per layer minimising ``sum_l sensitivity[l][b_l]`` with ``sum_l costs[l][b_l] <= budget``."""
    _check_inputs(sensitivity, costs)
    slack = 1e-9 * max(abs(budget), 1.0)  # float costs (e.g. averaged bits) must not fall off the edge
    frontier: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for sens, cost in zip(sensitivity, costs):
        grown = [
            (c + cost[b], e + sens[b], plan + (b,))
            for c, e, plan in frontier
            for b in CANDIDATE_BITS
            if c + cost[b] <= budget + slack
        ]
        grown.sort(key=lambda s: (s[0], s[1]))
        frontier = []
        for state in grown:
            # A partial plan is useful only if it beats every cheaper one on error.
            if not frontier or state[1] < frontier[-1][1]:
                frontier.append(state)
        if not frontier:
            raise _infeasible(costs, budget)
    return list(min(frontier, key=lambda s: (s[1], s[0]))[2])


def greedy_bits(
    sensitivity: Sequence[Mapping[int, float]], costs: Sequence[Mapping[int, float]], budget: float
) -> list[int]:
    """Start every layer at its cheapest bit-width, then repeatedly take the one-step upgrade (2->4, 4->8)
    with the largest KL reduction per unit of extra cost that still fits the budget."""
    _check_inputs(sensitivity, costs)
    order = sorted(CANDIDATE_BITS)
    levels = [0] * len(sensitivity)
    spent = sum(c[order[0]] for c in costs)
    if spent > budget * (1 + 1e-9):
        raise _infeasible(costs, budget)
    while True:
        best, best_ratio = None, 0.0
        for l, (sens, cost) in enumerate(zip(sensitivity, costs)):
            if levels[l] + 1 == len(order):
                continue
            cur, nxt = order[levels[l]], order[levels[l] + 1]
            extra = cost[nxt] - cost[cur]
            gain = sens[cur] - sens[nxt]
            if spent + extra > budget * (1 + 1e-9) or gain <= 0:
                continue
            ratio = gain / extra if extra > 0 else math.inf
            if ratio > best_ratio:
                best, best_ratio = l, ratio
        if best is None:
            return [order[i] for i in levels]
        spent += costs[best][order[levels[best] + 1]] - costs[best][order[levels[best]]]
        levels[best] += 1


def layer_costs(
    budget: Budget, num_layers: int, num_kv_heads: int, head_dim: int, group_size: int
) -> tuple[list[dict[int, float]], float]:
    """Per-layer cost tables and the total budget in the same unit, for either budget kind."""
    if budget.kind == "average_bits":
        return [{b: float(b) for b in CANDIDATE_BITS} for _ in range(num_layers)], budget.value * num_layers
    if budget.kind == "bytes_per_token":
        table = {b: float(bytes_per_token(num_kv_heads, head_dim, b, b, group_size)) for b in CANDIDATE_BITS}
        return [dict(table) for _ in range(num_layers)], budget.value
    raise ValueError(f"budget kind {budget.kind!r} is not one of {BUDGET_KINDS}")


def plan_bits(
    sensitivity: Sequence[Mapping[int, float]],
    budget: Budget,
    num_kv_heads: int,
    head_dim: int,
    group_size: int,
    residual_length: int,
    method: str = "exact",
) -> QuantPlan:
    """Choose per-layer bits for a model whose layers all have ``num_kv_heads`` x ``head_dim`` KV heads."""
    costs, total = layer_costs(budget, len(sensitivity), num_kv_heads, head_dim, group_size)
    solvers = {"exact": exact_bits, "greedy": greedy_bits}
    if method not in solvers:
        raise ValueError(f"method {method!r} is not one of {sorted(solvers)}")
    plan = QuantPlan(solvers[method](sensitivity, costs, total), group_size, residual_length, budget)
    validate_plan(plan, "plan")
    return plan


def validate_plan(plan: QuantPlan, source: str) -> None:
    """Raise QuantPlanError naming ``source`` and the field for any invalid value."""

    def fail(field: str, value: Any, why: str) -> QuantPlanError:
        return QuantPlanError(f"{source}: field {field!r} = {value!r} {why}")

    if plan.schema_version != SCHEMA_VERSION:
        raise fail("schema_version", plan.schema_version, f"is not the supported version {SCHEMA_VERSION}")
    if not isinstance(plan.bits, list) or not plan.bits:
        raise fail("bits", plan.bits, "must be a non-empty list of bit-widths, one per layer")
    for i, b in enumerate(plan.bits):
        if isinstance(b, bool) or b not in CANDIDATE_BITS:
            raise fail(f"bits[{i}]", b, f"is not one of {CANDIDATE_BITS}")
    for name in ("group_size", "residual_length"):
        value = getattr(plan, name)
        least = 1 if name == "group_size" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise fail(name, value, f"must be an integer >= {least}")
    if plan.budget.kind not in BUDGET_KINDS:
        raise fail("budget.kind", plan.budget.kind, f"is not one of {BUDGET_KINDS}")
    value = plan.budget.value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise fail("budget.value", value, "must be a positive number")
    if plan.budget.kind == "average_bits" and sum(plan.bits) > value * len(plan.bits) * (1 + 1e-9):
        raise fail("bits", plan.bits, f"average {sum(plan.bits) / len(plan.bits):g} exceeds budget.value")


def plan_to_dict(plan: QuantPlan) -> dict[str, Any]:
    return {
        "schema_version": plan.schema_version,
        "bits": list(plan.bits),
        "group_size": plan.group_size,
        "residual_length": plan.residual_length,
        "budget": {"kind": plan.budget.kind, "value": plan.budget.value},
    }


def plan_from_dict(data: Any, source: str) -> QuantPlan:
    """Parse and validate; unknown or missing keys are errors naming ``source`` and the field."""
    fields = {"schema_version", "bits", "group_size", "residual_length", "budget"}
    if not isinstance(data, dict):
        raise QuantPlanError(f"{source}: expected a JSON object, got {type(data).__name__}")
    unknown, missing = sorted(set(data) - fields), sorted(fields - set(data))
    if unknown:
        raise QuantPlanError(f"{source}: unknown field(s) {unknown}; allowed: {sorted(fields)}")
    if missing:
        raise QuantPlanError(f"{source}: missing field(s) {missing}")
    budget = data["budget"]
    if not isinstance(budget, dict) or set(budget) != {"kind", "value"}:
        raise QuantPlanError(f"{source}: field 'budget' = {budget!r} must be an object with 'kind' and 'value'")
    plan = QuantPlan(
        bits=data["bits"],
        group_size=data["group_size"],
        residual_length=data["residual_length"],
        budget=Budget(budget["kind"], budget["value"]),
        schema_version=data["schema_version"],
    )
    validate_plan(plan, source)
    return plan


def write_quant_plan(path: str | Path, plan: QuantPlan) -> None:
    """Validate and write ``quant_plan.json`` atomically."""
    validate_plan(plan, str(path))
    atomic_write_text(path, json.dumps(plan_to_dict(plan), indent=2) + "\n")


def read_quant_plan(path: str | Path) -> QuantPlan:
    """Read and validate ``quant_plan.json``; every error names the file and the field."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise QuantPlanError(f"{path}: not valid JSON ({err})") from err
    return plan_from_dict(data, str(path))
