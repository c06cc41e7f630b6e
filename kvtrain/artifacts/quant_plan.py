"""``quant_plan.json``: per-layer TaDA bit-widths chosen by calibration (`kvtrain.quant.bitplan` plans them).

Fields: ``schema_version``, ``bits`` (one bit-width per layer, keys and values alike), ``group_size``,
``residual_length`` and ``budget`` (``kind``: ``average_bits`` or ``bytes_per_token``, ``value``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtrain.errors import UserError
from kvtrain.io import CorruptFileError, read_checked_json, write_checked_json

QUANT_PLAN = "quant_plan.json"
SCHEMA_VERSION = 1
CANDIDATE_BITS = (2, 4, 8)
BUDGET_KINDS = ("average_bits", "bytes_per_token")


class QuantPlanError(UserError):
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
    write_checked_json(path, plan_to_dict(plan))


def read_quant_plan(path: str | Path) -> QuantPlan:
    """Read and validate ``quant_plan.json``; every error names the file and the field."""
    try:
        data = read_checked_json(path, "quant plan")
    except CorruptFileError as err:
        raise QuantPlanError(str(err)) from None
    return plan_from_dict(data, str(path))
