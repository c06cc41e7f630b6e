"""Per-layer pre-RoPE query statistics (mean, covariance) for Expected Attention, stored as safetensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

SCHEMA_VERSION = "1"
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
    metadata = {"kind": KIND, "schema_version": SCHEMA_VERSION, "fingerprint": json.dumps(fingerprint, sort_keys=True)}
    tensors = {"mu": mu.detach().float().cpu().contiguous(), "sigma": sigma.detach().float().cpu().contiguous()}
    save_file(tensors, str(path), metadata=metadata)


def load_query_stats(path: str | Path) -> QueryStats:
    """Read a file written by `save_query_stats`; wrong kind, schema, tensor names or shapes raise ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"query statistics file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        names = set(f.keys())
        if metadata.get("kind") != KIND:
            raise ValueError(f"{path} is not a query statistics file (metadata kind={metadata.get('kind')!r})")
        if metadata.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"{path}: schema_version {metadata.get('schema_version')!r} is not supported "
                f"(expected {SCHEMA_VERSION})"
            )
        if names != {"mu", "sigma"}:
            raise ValueError(f"{path}: expected tensors ['mu', 'sigma'], found {sorted(names)}")
        mu, sigma = f.get_tensor("mu"), f.get_tensor("sigma")
    _check_shapes(mu, sigma, str(path))
    return QueryStats(mu=mu.float(), sigma=sigma.float(), fingerprint=json.loads(metadata["fingerprint"]))
