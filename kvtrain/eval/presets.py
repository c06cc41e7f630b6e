"""Named compression methods for sweeps, each with three budgets (`low`, `mid`, `high` compression).

A preset is a `KVCompressionConfig` mapping plus, per budget, the fields that change. Eviction levels are the
fraction of tokens evicted (0.5 / 0.75 / 0.875), low rank the rank kept of each 64-dim head (32 / 16 / 8),
quantisation the bits (8 / 4 / 2). Low-rank presets read the projections of a calibration folder (the grid's
`artifacts`, made by `kvtrain calibrate --fit kqsvd --rank 32`, so every rank up to 32 can be cut from it).
Every preset compresses during decoding too, every 32 steps.
"""

from __future__ import annotations

import copy
from typing import Any

BUDGETS = ("low", "mid", "high")
_EVICT = {"low": {"compression_ratio": 0.5}, "mid": {"compression_ratio": 0.75}, "high": {"compression_ratio": 0.875}}
_COMMON = {"budget": None, "sinks": 4, "recent": 16, "query_window": 32, "selection": "per_layer",
           "schedule": {"interval": 32}}
_SNAPKV = {"scorer": {"name": "snapkv", "params": {"window": 32}}}
_RANKS = {"low": 32, "mid": 16, "high": 8}
_BITS = {"low": 8, "mid": 4, "high": 2}


def _lowrank(rank: int) -> dict[str, Any]:
    return {"lowrank": {"projections": "{artifacts}/kv_compression/projections.safetensors", "key_rank": rank,
                        "value_rank": rank}}


PRESETS: dict[str, dict[str, Any]] = {
    "streaming": {"config": {**_COMMON, "scorer": {"name": "streaming"}}, "budgets": _EVICT},
    "snapkv": {"config": {**_COMMON, **_SNAPKV}, "budgets": _EVICT},
    "gkv": {"config": {**_COMMON, "scorer": {"name": "gkv"}}, "budgets": _EVICT},
    "snapkv+keepkv": {"config": {**_COMMON, **_SNAPKV, "merge": {"name": "keepkv"}}, "budgets": _EVICT},
    "kqsvd": {"config": {**_COMMON, "compression_ratio": 0.0},
              "budgets": {b: _lowrank(r) for b, r in _RANKS.items()}},
    "tada": {"config": {**_COMMON, "compression_ratio": 0.0, "quant": {"group_size": 32}},
             "budgets": {b: {"quant": {"key_bits": bits, "value_bits": bits}} for b, bits in _BITS.items()}},
    # compositions: eviction at the three levels with 4-bit TaDA, or with rank-16 keys and values
    "snapkv+tada4": {"config": {**_COMMON, **_SNAPKV, "quant": {"key_bits": 4, "value_bits": 4, "group_size": 32}},
                     "budgets": _EVICT},
    "snapkv+kqsvd16": {"config": {**_COMMON, **_SNAPKV, **_lowrank(16)}, "budgets": _EVICT},
}
NEEDS_ARTIFACTS = {name for name, preset in PRESETS.items()
                   if "lowrank" in preset["config"] or any("lowrank" in b for b in preset["budgets"].values())}


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in, nested mappings merged key by key (a copy)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def fill_artifacts(data: Any, artifacts: str) -> Any:
    """Replace the `{artifacts}` placeholder in every string of a config mapping."""
    if isinstance(data, dict):
        return {k: fill_artifacts(v, artifacts) for k, v in data.items()}
    if isinstance(data, list):
        return [fill_artifacts(v, artifacts) for v in data]
    if isinstance(data, str):
        return data.replace("{artifacts}", artifacts)
    return data
