"""``query_stats.safetensors``: per-layer pre-RoPE query statistics (mean, covariance) for Expected Attention."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from kvtrain.artifacts.format import read_tagged_safetensors, write_tagged_safetensors

QUERY_STATS = "query_stats.safetensors"
SCHEMA_VERSION = 1
KIND = "kvtrain.query_stats"


@dataclass
class QueryStats:
    mu: Tensor  # [L, h_q, d] float32
    sigma: Tensor  # [L, h_q, d, d] float32
    fingerprint: dict[str, Any]


def _check_shapes(mu: Tensor, sigma: Tensor, where: str) -> None:
    if mu.dim() != 3:
        raise ValueError(f"{where}: mu must be [layers, query_heads, head_dim], got shape {tuple(mu.shape)}")
    L, h, d = mu.shape
    if tuple(sigma.shape) != (L, h, d, d):
        raise ValueError(
            f"{where}: sigma must be [layers, query_heads, head_dim, head_dim] = {(L, h, d, d)} to match mu, "
            f"got shape {tuple(sigma.shape)}"
        )


def save_query_stats(path: str | Path, mu: Tensor, sigma: Tensor, fingerprint: dict[str, Any]) -> None:
    """Write ``mu`` ``[L, h_q, d]`` and ``sigma`` ``[L, h_q, d, d]`` with a JSON model fingerprint."""
    _check_shapes(mu, sigma, f"save_query_stats({path})")
    metadata = {"fingerprint": json.dumps(fingerprint, sort_keys=True)}
    write_tagged_safetensors(Path(path), {"mu": mu, "sigma": sigma}, KIND, SCHEMA_VERSION, metadata)


def load_query_stats(path: str | Path) -> QueryStats:
    """Read a file written by `save_query_stats`; wrong kind, schema, tensor names or shapes raise ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"query statistics file {path} does not exist")
    metadata, tensors = read_tagged_safetensors(path, KIND, SCHEMA_VERSION)
    if set(tensors) != {"mu", "sigma"}:
        raise ValueError(f"{path}: expected tensors ['mu', 'sigma'], found {sorted(tensors)}")
    mu, sigma = tensors["mu"], tensors["sigma"]
    _check_shapes(mu, sigma, str(path))
    return QueryStats(mu=mu.float(), sigma=sigma.float(), fingerprint=json.loads(metadata["fingerprint"]))
