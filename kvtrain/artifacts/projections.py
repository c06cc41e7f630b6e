"""``projections.safetensors``: per-layer low-rank key and value projection pairs (KQ-SVD and its baselines).

Per layer ``layers.{l}.A``/``B`` (keys, ``[h_kv, d, r_l]``), ``A_v``/``B_v`` (values, ``[h_kv, d, rv_l]``) and
``S``/``S_v`` (the spectra ``[h_kv, d]``); metadata: kind, schema version, method, ranks and model fingerprint.
`LowRankPair` and `Projections` are what the file holds in memory; `kvtrain.lowrank` fits them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvtrain.artifacts.format import check_recorded_fingerprint, read_tagged_safetensors, write_tagged_safetensors
from kvtrain.models.shape import ModelShape

PROJECTIONS = "projections.safetensors"
PROJECTIONS_KIND = "kvtrain.projections"
SCHEMA_VERSION = 1
METHODS = ("kqsvd", "ksvd", "eigen")


@dataclass(frozen=True)
class LowRankPair:
    """One projection pair per KV head: ``a`` for the cached side, ``b`` for its partner.

    Keys: ``k~ = k @ a[h]`` is cached and query head j of KV head h uses ``q~ = q_j @ b[h]``, so that
    ``q~ . k~ = q^T b a^T k``. Values: ``v~ = v @ a[h]`` is cached and ``b`` is folded into o_proj.
    ``singular_values`` (float64 ``[h_kv, d]``, descending) is the spectrum of the matrix whose truncation
    the method performs: its squared tail beyond r is that method's rank-r error (for KQ-SVD, exactly the
    calibration objective).
    """

    a: Tensor  # [h_kv, d, r]
    b: Tensor  # [h_kv, d, r]
    singular_values: Tensor  # [h_kv, d]

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def truncate(self, rank: int) -> LowRankPair:
        """The pair restricted to its first ``rank`` columns (optimal at that rank for KQ-SVD and K-SVD)."""
        if not 1 <= rank <= self.rank:
            raise ValueError(f"rank={rank} must be in [1, {self.rank}]")
        return LowRankPair(self.a[..., :rank], self.b[..., :rank], self.singular_values)

    def to(self, dtype: torch.dtype) -> LowRankPair:
        return LowRankPair(self.a.to(dtype), self.b.to(dtype), self.singular_values)


@dataclass
class Projections:
    """Per layer key pair (``a = A``, ``b = B``) and value pair (``a = A_v``, ``b = B_v``), ``[h_kv, d, r_l]``."""

    method: str
    keys: list[LowRankPair]
    values: list[LowRankPair]

    @property
    def key_ranks(self) -> list[int]:
        return [p.rank for p in self.keys]

    @property
    def value_ranks(self) -> list[int]:
        return [p.rank for p in self.values]


_PARTS = (("A", "keys", "a"), ("B", "keys", "b"), ("S", "keys", "singular_values"),
          ("A_v", "values", "a"), ("B_v", "values", "b"), ("S_v", "values", "singular_values"))


def write_projections(path: Path, projections: Projections, fingerprint: dict[str, Any]) -> None:
    tensors: dict[str, Tensor] = {}
    for name, side, part in _PARTS:
        for layer, pair in enumerate(getattr(projections, side)):
            tensors[f"layers.{layer}.{name}"] = getattr(pair, part)
    metadata = {
        "method": projections.method,
        "key_ranks": json.dumps(projections.key_ranks),
        "value_ranks": json.dumps(projections.value_ranks),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
    }
    write_tagged_safetensors(path, tensors, PROJECTIONS_KIND, SCHEMA_VERSION, metadata)


def read_projections(path: Path, num_layers: int, num_kv_heads: int, head_dim: int) -> Projections:
    """Read and shape-check ``projections.safetensors``; every error names the file."""
    metadata, tensors = read_tagged_safetensors(path, PROJECTIONS_KIND, SCHEMA_VERSION)
    return _projections(path, metadata, tensors, num_layers, num_kv_heads, head_dim)


def read_projections_for_model(path: str | Path, model_config) -> Projections:
    """`read_projections`, after checking that the file was calibrated on a model of `model_config`'s fingerprint."""
    path = Path(path)
    metadata, tensors = read_tagged_safetensors(path, PROJECTIONS_KIND, SCHEMA_VERSION)
    check_recorded_fingerprint(metadata, model_config, path)
    shape = ModelShape.of(model_config)
    return _projections(path, metadata, tensors, shape.num_layers, shape.num_kv_heads, shape.head_dim)


def _projections(path: Path, metadata: dict[str, str], tensors: dict[str, Tensor], num_layers: int,
                 num_kv_heads: int, head_dim: int) -> Projections:
    method = metadata.get("method")
    if method not in METHODS:
        raise ValueError(f"{path}: method={method!r} is not one of {METHODS}")
    key_ranks, value_ranks = json.loads(metadata["key_ranks"]), json.loads(metadata["value_ranks"])
    for name, ranks in (("key_ranks", key_ranks), ("value_ranks", value_ranks)):
        if len(ranks) != num_layers:
            raise ValueError(f"{path}: {name} has {len(ranks)} layers, the model has {num_layers}")
    keys, values = [], []
    for layer in range(num_layers):
        got = {}
        for name, rank in (("A", key_ranks[layer]), ("B", key_ranks[layer]), ("S", None),
                           ("A_v", value_ranks[layer]), ("B_v", value_ranks[layer]), ("S_v", None)):
            key = f"layers.{layer}.{name}"
            shape = (num_kv_heads, head_dim) if rank is None else (num_kv_heads, head_dim, rank)
            if key not in tensors:
                raise ValueError(f"{path}: tensor {key} is missing")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
            if not torch.isfinite(tensors[key]).all():
                raise ValueError(f"{path}: tensor {key} contains NaN or inf")
            got[name] = tensors[key]
        keys.append(LowRankPair(got["A"], got["B"], got["S"].double()))
        values.append(LowRankPair(got["A_v"], got["B_v"], got["S_v"].double()))
    return Projections(method, keys, values)
