"""Calibration artifacts under ``DIR/kv_compression/``: writing them and loading them back, validated.

``config.json`` (written last, so its presence means a complete run) records the schema version, the model
fingerprint, where the calibration tokens came from (source, split, blocks, sha256 of the token ids), every
hyperparameter, the fitted ranks, and the sha256 of every other artifact file, so that a file changed or
damaged after calibration is reported by name. The other files:

* ``projections.safetensors``: per layer ``layers.{l}.A``/``B`` (keys, ``[h_kv, d, r_l]``), ``A_v``/``B_v``
  (values, ``[h_kv, d, rv_l]``), ``S``/``S_v`` (the spectra ``[h_kv, d]``); metadata: method and ranks;
* ``quant_plan.json`` (`kvtrain.quant.write_quant_plan`), ``query_stats.safetensors``
  (`kvtrain.policies.query_stats`), ``head_budgets.json`` (``{"budgets": [...], "heads": {...}}``),
  ``sals_basis.safetensors`` (`kvtrain.calibrate.sals_basis`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from kvtrain.calibrate.fit import METHODS, Projections
from kvtrain.calibrate.sals_basis import SALS_BASIS, read_sals_basis
from kvtrain.io import atomic_write_bytes, atomic_write_text, read_tagged_safetensors
from kvtrain.lowrank import LowRankPair
from kvtrain.lowrank.sals import SalsBasis
from kvtrain.models import check_fingerprint, model_fingerprint
from kvtrain.policies.budgets import layer_budgets
from kvtrain.policies.query_stats import QueryStats, load_query_stats
from kvtrain.quant import QuantPlan, read_quant_plan

SCHEMA_VERSION = 1
KIND = "kvtrain.calibration"
PROJECTIONS_KIND = "kvtrain.projections"
ARTIFACT_DIR = "kv_compression"
CONFIG = "config.json"
PROJECTIONS = "projections.safetensors"
QUANT_PLAN = "quant_plan.json"
QUERY_STATS = "query_stats.safetensors"
HEAD_BUDGETS = "head_budgets.json"


@dataclass
class CalibrationArtifacts:
    """What `load_artifacts` found; a part is None when its fit was not run."""

    directory: Path
    config: dict[str, Any]
    projections: Projections | None
    quant_plan: QuantPlan | None
    query_stats: QueryStats | None
    head_budgets: dict[str, Any] | None
    sals_basis: list[SalsBasis] | None = None  # per layer, every calibrated direction

    @property
    def head_budgets_path(self) -> Path:
        """The file to set as ``KVCompressionConfig.layer_budgets``."""
        return self.directory / HEAD_BUDGETS


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header keys sorted.

    safetensors serialises the header from a hash map whose order changes between processes; sorting it
    makes equal contents give equal bytes (data offsets are relative to the end of the header, so they hold).
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8-byte alignment
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def write_projections(path: Path, projections: Projections, fingerprint: dict[str, Any]) -> None:
    tensors: dict[str, Tensor] = {}
    for layer, (k, v) in enumerate(zip(projections.keys, projections.values)):
        for name, t in (("A", k.a), ("B", k.b), ("S", k.singular_values), ("A_v", v.a), ("B_v", v.b),
                        ("S_v", v.singular_values)):
            tensors[f"layers.{layer}.{name}"] = t.detach().to(torch.float32).cpu().contiguous()
    metadata = {
        "kind": PROJECTIONS_KIND,
        "schema_version": str(SCHEMA_VERSION),
        "method": projections.method,
        "key_ranks": json.dumps(projections.key_ranks),
        "value_ranks": json.dumps(projections.value_ranks),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
    }
    atomic_write_bytes(path, canonical_safetensors(save(tensors, metadata=metadata)))


def read_projections(path: Path, num_layers: int, num_kv_heads: int, head_dim: int) -> Projections:
    """Read and shape-check ``projections.safetensors``; every error names the file."""
    metadata, tensors = read_tagged_safetensors(path, PROJECTIONS_KIND, SCHEMA_VERSION)
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


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """Write ``config.json`` with the sha256 of every artifact file already in ``folder``."""
    names = (PROJECTIONS, QUANT_PLAN, QUERY_STATS, HEAD_BUDGETS, SALS_BASIS)
    files = {name: sha256_file(folder / name) for name in names
             if (folder / name).is_file() and name in config["files"]}
    atomic_write_text(folder / CONFIG, json.dumps({**config, "files": files}, indent=2, sort_keys=True) + "\n")


def artifact_folder(directory: str | Path) -> Path:
    """``DIR/kv_compression`` for a calibration output ``DIR``, or the folder itself if it is that folder."""
    directory = Path(directory)
    if (directory / ARTIFACT_DIR / CONFIG).is_file():
        return directory / ARTIFACT_DIR
    if (directory / CONFIG).is_file():
        return directory
    raise FileNotFoundError(f"{directory}: no {ARTIFACT_DIR}/{CONFIG} (not a calibration output)")


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("kind") != KIND:
        kind = config.get("kind") if isinstance(config, dict) else None
        raise ValueError(f"{path}: not a calibration config (kind={kind!r}, expected {KIND!r})")
    if config.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version={config.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    for field in ("model_fingerprint", "files", "data", "settings", "fit"):
        if field not in config:
            raise ValueError(f"{path}: missing field {field!r}")
    return config


def load_artifacts(directory: str | Path, model) -> CalibrationArtifacts:
    """Load and validate the artifacts of ``kvtrain calibrate --out DIR`` for ``model``.

    Checks the schema, the model fingerprint (the first differing field is named), each file's sha256
    against ``config.json`` and every tensor shape; any problem raises ValueError naming the file.
    """
    from kvtrain.calibrate.statistics import ModelShape

    folder = artifact_folder(directory)
    config = read_config(folder / CONFIG)
    check_fingerprint(config["model_fingerprint"], model_fingerprint(model.config), folder / CONFIG)
    for name, digest in config["files"].items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path}: listed in {CONFIG} but missing")
        if sha256_file(path) != digest:
            raise ValueError(f"{path}: sha256 differs from {CONFIG} (file corrupt or modified after calibration)")
    shape = ModelShape.of(model)
    files = config["files"]
    projections = (
        read_projections(folder / PROJECTIONS, shape.num_layers, shape.num_kv_heads, shape.head_dim)
        if PROJECTIONS in files else None
    )
    plan = None
    if QUANT_PLAN in files:
        plan = read_quant_plan(folder / QUANT_PLAN)
        if len(plan.bits) != shape.num_layers:
            raise ValueError(f"{folder / QUANT_PLAN}: {len(plan.bits)} layers, the model has {shape.num_layers}")
    stats = None
    if QUERY_STATS in files:
        stats = load_query_stats(folder / QUERY_STATS)
        expected = (shape.num_layers, shape.num_heads, shape.head_dim)
        if tuple(stats.mu.shape) != expected:
            raise ValueError(f"{folder / QUERY_STATS}: mu has shape {tuple(stats.mu.shape)}, expected {expected}")
    budgets = None
    if HEAD_BUDGETS in files:
        layer_budgets(folder / HEAD_BUDGETS, shape.num_layers, 1)  # validates the format the cache reads
        budgets = json.loads((folder / HEAD_BUDGETS).read_text())
    sals_basis = read_sals_basis(folder / SALS_BASIS, model.config) if SALS_BASIS in files else None
    return CalibrationArtifacts(folder, config, projections, plan, stats, budgets, sals_basis)


def projections_for(lowrank, model_config) -> tuple[list[LowRankPair | None], list[LowRankPair | None]]:
    """Per-layer key and value pairs for a `LowRankConfig`: read, checked against the model, truncated."""
    path = Path(lowrank.projections)
    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = json.loads((f.metadata() or {}).get("fingerprint", "{}"))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    actual = model_fingerprint(model_config)
    check_fingerprint(recorded, actual, path)
    projections = read_projections(path, actual["num_hidden_layers"], actual["num_key_value_heads"], actual["head_dim"])
    sides = []
    for use, rank, pairs, side in (
        (lowrank.keys, lowrank.key_rank, projections.keys, "key"),
        (lowrank.values, lowrank.value_rank, projections.values, "value"),
    ):
        if not use:
            sides.append([None] * len(pairs))
            continue
        if rank is not None and any(rank > p.rank for p in pairs):
            raise ValueError(f"{path}: {side} rank {rank} requested, the file holds ranks {[p.rank for p in pairs]}")
        sides.append([p.truncate(rank) if rank is not None else p for p in pairs])
    return sides[0], sides[1]
