"""Per-layer TaDA bit-widths under a memory budget (the plan is written as ``quant_plan.json`` by
`kvtrain.artifacts.quant_plan`).

Input: ``sensitivity[l][b]``, the output KL measured when layer l alone is quantised at b bits. The plan
minimises the summed sensitivity (layers are assumed to add up) subject to ``sum_l cost[l][b_l] <= budget``,
a multiple-choice knapsack. `exact_bits` solves it exactly by dynamic programming over the Pareto frontier
of (cost, error) partial plans; `greedy_bits` upgrades the layer with the best KL reduction per extra
byte until nothing fits (fast, not always optimal).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from kvtrain.artifacts.quant_plan import BUDGET_KINDS, CANDIDATE_BITS, Budget, QuantPlan, validate_plan
from kvtrain.quant.tada import bytes_per_token


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
