"""A calibration output, ``DIR/kv_compression/``: its manifest, and loading every artifact back validated.

``config.json`` (written last, so its presence means a complete run) records the schema version, the model
fingerprint, where the calibration tokens came from (source, split, blocks, sha256 of the token ids), every
hyperparameter, the fitted ranks, and the sha256 of every other artifact file, so that a file changed or
damaged after calibration is reported by name. The other files, each with its own module in this package:
``projections.safetensors``, ``quant_plan.json``, ``query_stats.safetensors``, ``head_budgets.json`` and
``sals_basis.safetensors``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtrain.artifacts.format import sha256_file
from kvtrain.artifacts.head_budgets import HEAD_BUDGETS, read_head_budgets
from kvtrain.artifacts.projections import PROJECTIONS, Projections, read_projections
from kvtrain.artifacts.quant_plan import QUANT_PLAN, QuantPlan, read_quant_plan
from kvtrain.artifacts.query_stats import QUERY_STATS, QueryStats, load_query_stats
from kvtrain.artifacts.sals_basis import SALS_BASIS, SalsBasis, read_sals_basis
from kvtrain.io import read_checked_json, write_checked_json
from kvtrain.models.shape import ModelShape, check_fingerprint, model_fingerprint

SCHEMA_VERSION = 1
KIND = "kvtrain.calibration"
ARTIFACT_DIR = "kv_compression"
CONFIG = "config.json"


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


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """Write ``config.json`` with the sha256 of every artifact file already in ``folder``."""
    names = (PROJECTIONS, QUANT_PLAN, QUERY_STATS, HEAD_BUDGETS, SALS_BASIS)
    files = {name: sha256_file(folder / name) for name in names
             if (folder / name).is_file() and name in config["files"]}
    write_checked_json(folder / CONFIG, {**config, "files": files})


def artifact_folder(directory: str | Path) -> Path:
    """``DIR/kv_compression`` for a calibration output ``DIR``, or the folder itself if it is that folder."""
    directory = Path(directory)
    if (directory / ARTIFACT_DIR / CONFIG).is_file():
        return directory / ARTIFACT_DIR
    if (directory / CONFIG).is_file():
        return directory
    raise FileNotFoundError(f"{directory}: no {ARTIFACT_DIR}/{CONFIG} (not a calibration output)")


def read_config(path: Path) -> dict[str, Any]:
    config = read_checked_json(path, "calibration config")
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
        read_head_budgets(folder / HEAD_BUDGETS, shape.num_layers)  # validates the format the cache reads
        budgets = json.loads((folder / HEAD_BUDGETS).read_text())
    sals_basis = read_sals_basis(folder / SALS_BASIS, model.config) if SALS_BASIS in files else None
    return CalibrationArtifacts(folder, config, projections, plan, stats, budgets, sals_basis)
