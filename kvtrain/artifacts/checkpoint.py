"""A compression-ready checkpoint's ``kv_compression/`` bundle: the compression config it was trained for and a
copy of every artifact file that config references, checked by a manifest.

A checkpoint folder holds the weights (`save_pretrained`: full weights or a LoRA adapter), the tokenizer,
``kvtrain_training.json`` (how it was trained) and ``kv_compression/``:

* ``compression.json``: the `KVCompressionConfig`, its artifact paths relative to ``kv_compression/``;
* the artifact files it names (projections, quant plan, head budgets, query statistics, SALS basis);
* ``config.json``, written last (its presence means a complete bundle): ``kind``, ``schema_version``, the model
  fingerprint and the sha256 of every other file in the bundle.

Reading checks the schema version (a newer one is refused with what to do), that every listed file exists and
has its recorded sha256, and hands back the config as a plain dict for the caller to validate. Once the model is
loaded, `check_artifact_fingerprints` checks the model fingerprint each safetensors artifact records.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from kvtrain.artifacts.format import sha256_file
from kvtrain.io import atomic_write_bytes, atomic_write_text, read_checked_json, write_checked_json
from kvtrain.models.shape import check_fingerprint, model_fingerprint

ARTIFACT_DIR = "kv_compression"
MANIFEST = "config.json"
COMPRESSION = "compression.json"
COMPRESSION_CONFIG = Path(ARTIFACT_DIR) / COMPRESSION
TRAINING_METADATA = "kvtrain_training.json"
KIND = "kvtrain.checkpoint"
SCHEMA_VERSION = 1

# What goes into the bundle under a name: a file to copy, or a function writing the file at the given path.
BundleSource = Path | Callable[[Path], None]


@dataclass
class Bundle:
    """A checked ``kv_compression/`` folder."""

    folder: Path
    compression: dict[str, Any]  # the KVCompressionConfig as saved (artifact paths relative to `folder`)
    model_fingerprint: dict[str, Any]
    files: dict[str, str]  # name -> sha256, `compression.json` included

    def path_of(self, name: str) -> str:
        """An artifact path of `compression` resolved inside the bundle."""
        return str(self.folder / name)


def write_bundle(
    output_dir: str | Path, compression: dict[str, Any], sources: dict[str, BundleSource], fingerprint: dict[str, Any]
) -> Path:
    """Write ``output_dir/kv_compression/``: each of `sources` under its name, the config, then the manifest.

    `compression` must already name its artifacts by those names (see `KVCompressionConfig.with_artifact_paths`).
    """
    folder = Path(output_dir) / ARTIFACT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        target = folder / name
        if callable(source):
            source(target)
        elif Path(source).resolve() != target.resolve():
            atomic_write_bytes(target, Path(source).read_bytes())
    atomic_write_text(folder / COMPRESSION, json.dumps(compression, indent=2) + "\n")
    files = {name: sha256_file(folder / name) for name in [*sources, COMPRESSION]}
    manifest = {"kind": KIND, "schema_version": SCHEMA_VERSION, "model_fingerprint": fingerprint, "files": files}
    write_checked_json(folder / MANIFEST, manifest)
    return folder


def read_bundle(checkpoint: str | Path) -> Bundle:
    """The checked bundle of a checkpoint folder; every error names the file and what is wrong with it."""
    folder = Path(checkpoint) / ARTIFACT_DIR
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{checkpoint}: not a compression-ready checkpoint (no {ARTIFACT_DIR}/{MANIFEST})")
    manifest = read_checked_json(manifest_path, "bundle manifest")
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        kind = manifest.get("kind") if isinstance(manifest, dict) else None
        raise ValueError(f"{manifest_path}: not a checkpoint manifest (kind={kind!r}, expected {KIND!r})")
    version = manifest.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{manifest_path}: schema_version={version!r} is not an integer")
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"{manifest_path}: schema_version {version} was written by a newer kvtrain (this one reads up to "
            f"{SCHEMA_VERSION}); upgrade kvtrain"
        )
    if version < SCHEMA_VERSION:
        raise ValueError(f"{manifest_path}: schema_version {version} is no longer supported (this kvtrain reads "
                         f"{SCHEMA_VERSION}); re-export the checkpoint")
    files = manifest.get("files")
    if not isinstance(files, dict) or COMPRESSION not in files:
        raise ValueError(f"{manifest_path}: field 'files' must map file names to sha256 and list {COMPRESSION}")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path}: listed in {MANIFEST} but missing")
        if sha256_file(path) != digest:
            raise ValueError(f"{path}: sha256 differs from {MANIFEST} (file corrupt or modified after it was written)")
    return Bundle(folder, _read_json(folder / COMPRESSION), manifest.get("model_fingerprint") or {}, files)


def check_artifact_fingerprints(bundle: Bundle, model_config) -> list[str]:
    """Raise unless every safetensors artifact of the bundle that records a model fingerprint records
    `model_config`'s; returns the names of the files checked.

    The manifest's fingerprint covers the bundle as a whole; this checks each calibrated file as well, so a
    projections file of another model copied into a bundle (and its manifest rewritten) is still refused.
    """
    checked = []
    for name in sorted(bundle.files):
        if not name.endswith(".safetensors"):
            continue  # JSON artifacts (budgets, bit plans) are checked against the layer count when read
        path = bundle.folder / name
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
        if "fingerprint" in metadata:
            check_fingerprint(json.loads(metadata["fingerprint"]), model_fingerprint(model_config), path)
            checked.append(name)
    return checked


def write_training_metadata(output_dir: str | Path, metadata: dict[str, Any]) -> None:
    atomic_write_text(Path(output_dir) / TRAINING_METADATA, json.dumps(metadata, indent=2, default=str))


def read_training_metadata(checkpoint: str | Path) -> dict[str, Any]:
    file = Path(checkpoint) / TRAINING_METADATA
    if not file.is_file():
        raise ValueError(f"{checkpoint}: not a kvtrain training output (no {TRAINING_METADATA})")
    return _read_json(file)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON ({err})") from None
