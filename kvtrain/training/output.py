"""What a training run leaves next to its weights: the `kv_compression/` bundle (`kvtrain.artifacts.checkpoint`)
and `kvtrain_training.json`.

The bundle holds the compression config the model was trained for and a copy of every artifact file it
references, except the low-rank projections when they were trained: those are written in their place, under
the calibrated file's name, in the calibration format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvtrain.artifacts.checkpoint import ARTIFACT_DIR, BundleSource, write_bundle, write_training_metadata
from kvtrain.config import KVCompressionConfig
from kvtrain.io import LOCK_FILE, write_manifest
from kvtrain.training.projections import TrainableProjections


def write_artifacts(
    output_dir: str | Path,
    kv_config: KVCompressionConfig,
    metadata: dict[str, Any],
    *,
    projections: TrainableProjections | None = None,
) -> None:
    """Write the bundle and the training metadata (JSON, atomically) next to the weights."""
    trained_source = kv_config.lowrank.projections if projections is not None else None
    sources: dict[str, BundleSource] = {}

    def bundle(path: str) -> str:
        name = Path(path).name
        source: BundleSource = projections.save if path == trained_source else Path(path)
        if name in sources and sources[name] != source:
            raise ValueError(f"two artifact files of the compression config are both named {name!r}: {path} "
                             "and another; rename one")
        sources[name] = source
        return name

    bundled = kv_config.with_artifact_paths(bundle)
    write_bundle(output_dir, bundled.to_dict(), sources, metadata.get("model_fingerprint", {}))
    write_training_metadata(output_dir, metadata)


def write_output_manifest(output_dir: str | Path) -> None:
    """The sha256 of every file of a finished output (weights, tokenizer, metadata and `kv_compression/`), which
    `kvtrain.load_compressed` checks; the checkpoints inside it have manifests of their own."""
    def skip(relative: Path) -> bool:  # checkpoints, and the job's own lock (gone once it ends)
        return relative.name == LOCK_FILE or (len(relative.parts) > 1 and relative.parts[0] != ARTIFACT_DIR)

    write_manifest(output_dir, skip=skip)
