"""``sals_basis.safetensors``: every layer's joint pre-RoPE key eigenbasis (SALS), written and read back checked.

Per layer ``layers.{l}.U`` ``[h_kv*d, c_l]`` holds the eigenvectors of ``C = K^T K`` by descending eigenvalue
and ``layers.{l}.eigenvalues`` ``[h_kv*d]`` the whole spectrum. ``c_l = min(h_kv*d, calibration tokens)``:
all the directions the data determines, so that any rank up to it can be chosen at run time (the columns
are nested: rank r uses the first r). Metadata: kind, schema version, model fingerprint, tokens per layer.
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

SALS_BASIS = "sals_basis.safetensors"
SALS_BASIS_KIND = "kvtrain.sals_basis"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SalsBasis:
    """One layer's joint latent basis: ``basis`` ``[h_kv*d, r]`` (orthonormal columns, by descending energy)
    and the full eigenvalue spectrum of ``C = K^T K`` (``[h_kv*d]``, descending)."""

    basis: Tensor
    eigenvalues: Tensor
    num_kv_heads: int
    head_dim: int

    @property
    def rank(self) -> int:
        return self.basis.shape[-1]


def write_sals_basis(path: Path, bases: list[SalsBasis], num_tokens: list[int], fingerprint: dict[str, Any]) -> None:
    tensors: dict[str, Tensor] = {}
    for layer, basis in enumerate(bases):
        tensors[f"layers.{layer}.U"] = basis.basis
        tensors[f"layers.{layer}.eigenvalues"] = basis.eigenvalues
    metadata = {"fingerprint": json.dumps(fingerprint, sort_keys=True), "num_tokens": json.dumps(num_tokens)}
    write_tagged_safetensors(path, tensors, SALS_BASIS_KIND, SCHEMA_VERSION, metadata)


def read_sals_basis(path: str | Path, model_config, rank: int | None = None) -> list[SalsBasis]:
    """Per-layer bases truncated to ``rank`` (None: all stored columns), checked against ``model_config``.

    Every error names the file: unreadable or foreign file, another model (the differing fingerprint fields),
    missing / misshapen / non-finite tensors, a rank above the joint key width or above what the
    calibration tokens determine.
    """
    path = Path(path)
    metadata, tensors = read_tagged_safetensors(path, SALS_BASIS_KIND, SCHEMA_VERSION)
    check_recorded_fingerprint(metadata, model_config, path)
    shape = ModelShape.of(model_config)
    num_layers, h_kv, d = shape.num_layers, shape.num_kv_heads, shape.head_dim
    width = h_kv * d
    if rank is not None and not 1 <= rank <= width:
        raise ValueError(f"{path}: SALS rank {rank} must be in [1, h_kv*d={width}] (the joint key width)")
    num_tokens = json.loads(metadata.get("num_tokens", "[]"))
    if len(num_tokens) != num_layers:
        raise ValueError(f"{path}: num_tokens has {len(num_tokens)} layers, the model has {num_layers}")
    bases = []
    for layer in range(num_layers):
        u, vals = _tensor(tensors, path, f"layers.{layer}.U"), _tensor(tensors, path, f"layers.{layer}.eigenvalues")
        if u.dim() != 2 or u.shape[0] != width or not 1 <= u.shape[1] <= width:
            raise ValueError(
                f"{path}: tensor layers.{layer}.U has shape {tuple(u.shape)}, expected ({width}, <= {width})"
            )
        if tuple(vals.shape) != (width,):
            raise ValueError(
                f"{path}: tensor layers.{layer}.eigenvalues has shape {tuple(vals.shape)}, expected ({width},)"
            )
        if rank is not None and rank > u.shape[1]:
            raise ValueError(
                f"{path}: SALS rank {rank} exceeds the {u.shape[1]} directions layer {layer} was calibrated with "
                f"({num_tokens[layer]} tokens); calibrate on more tokens"
            )
        bases.append(SalsBasis(u if rank is None else u[:, :rank].contiguous(), vals, h_kv, d))
    return bases


def _tensor(tensors: dict[str, Tensor], path: Path, key: str) -> Tensor:
    if key not in tensors:
        raise ValueError(f"{path}: tensor {key} is missing")
    if not torch.isfinite(tensors[key]).all():
        raise ValueError(f"{path}: tensor {key} contains NaN or inf")
    return tensors[key]
