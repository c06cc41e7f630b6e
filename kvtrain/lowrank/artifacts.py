"""`projections.safetensors`: per-layer key and value projection pairs, with the model they belong to.

Tensors ``layers.{i}.{key|value}.{a|b|singular_values}`` (a, b: [h_kv, d, r_i], ranks may differ per layer;
a side may be absent); metadata ``schema_version``, ``method`` and the model ``fingerprint`` (JSON).
Loading checks the fingerprint against the model and names the file and the field that disagrees.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from kvtrain.io import atomic_write_bytes
from kvtrain.lowrank.kqsvd import LowRankPair
from kvtrain.models import model_fingerprint

SCHEMA_VERSION = 1
SIDES = ("key", "value")


def save_projections(
    path: str | Path,
    pairs: dict[str, list[LowRankPair | None]],
    *,
    model_config,
    method: str,
    extra: dict | None = None,
) -> None:
    """`pairs["key"][i]` / `pairs["value"][i]`: the pair of layer i (None: that side stays full rank)."""
    tensors = {}
    for side in SIDES:
        for i, pair in enumerate(pairs.get(side, [])):
            if pair is None:
                continue
            for name in ("a", "b", "singular_values"):
                tensors[f"layers.{i}.{side}.{name}"] = getattr(pair, name).contiguous().cpu()
    metadata = {
        "schema_version": str(SCHEMA_VERSION),
        "method": method,
        "fingerprint": json.dumps(model_fingerprint(model_config)),
        **{k: json.dumps(v) for k, v in (extra or {}).items()},
    }
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_projections(lowrank, model_config) -> tuple[list[LowRankPair | None], list[LowRankPair | None]]:
    """Key and value pairs per layer for a `LowRankConfig`, truncated to its ranks, validated against the model."""
    path = Path(lowrank.projections)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{path}: cannot read projections ({err})") from None
    if metadata.get("schema_version") != str(SCHEMA_VERSION):
        raise ValueError(f"{path}: field 'schema_version' = {metadata.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    stored = json.loads(metadata.get("fingerprint", "{}"))
    expected = model_fingerprint(model_config)
    for field in ("model_type", "num_hidden_layers", "num_key_value_heads", "head_dim"):
        if stored.get(field) != expected[field]:
            raise ValueError(
                f"{path}: projections were fitted for a model with {field}={stored.get(field)!r}, "
                f"this model has {field}={expected[field]!r}"
            )
    num_layers = model_config.num_hidden_layers
    wanted = {"key": (lowrank.keys, lowrank.key_rank), "value": (lowrank.values, lowrank.value_rank)}
    result = {}
    for side in SIDES:
        use, rank = wanted[side]
        pairs = []
        for i in range(num_layers):
            prefix = f"layers.{i}.{side}."
            if not use or prefix + "a" not in tensors:
                pairs.append(None)
                continue
            pair = LowRankPair(tensors[prefix + "a"], tensors[prefix + "b"], tensors[prefix + "singular_values"])
            shape = (expected["num_key_value_heads"], expected["head_dim"])
            if tuple(pair.a.shape[:2]) != shape or pair.a.shape != pair.b.shape:
                raise ValueError(f"{path}: field '{prefix}a' has shape {tuple(pair.a.shape)}, expected {shape} + (rank,)")
            if rank is not None:
                if rank > pair.rank:
                    raise ValueError(f"{path}: layer {i} {side} projections have rank {pair.rank} < requested {rank}")
                pair = pair.truncate(rank)
            pairs.append(LowRankPair(pair.a.float(), pair.b.float(), pair.singular_values))
        result[side] = pairs
    if lowrank.keys and all(p is None for p in result["key"]) and lowrank.values and all(p is None for p in result["value"]):
        raise ValueError(f"{path}: holds no projections")
    return result["key"], result["value"]
