"""What every kvtrain artifact file shares: safetensors tagged with a kind, a schema version and the model
fingerprint, written canonically (equal contents give equal bytes) and atomically, with the sha256 of its content in
its own metadata, checked by the one reader (`read_tagged_safetensors`) wherever the file is read from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from kvtrain.io import DIGEST_KEY, CorruptFileError, atomic_write_bytes, sha256_bytes, sha256_of_file
from kvtrain.models.shape import check_fingerprint, model_fingerprint


def sha256_file(path: Path) -> str:
    return sha256_of_file(path)


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


def write_tagged_safetensors(
    path: Path, tensors: dict[str, Tensor], kind: str, schema_version: int, metadata: dict[str, str]
) -> None:
    """Write ``tensors`` (float32, contiguous, on the CPU) with ``kind``/``schema_version`` metadata, atomically."""
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}
    tagged = {"kind": kind, "schema_version": str(schema_version), **metadata}
    digest = _content_digest(*_split(canonical_safetensors(save(tensors, metadata=tagged))))
    atomic_write_bytes(path, canonical_safetensors(save(tensors, metadata={**tagged, DIGEST_KEY: digest})))


def _split(data: bytes) -> tuple[dict, bytes]:
    """(header, tensor bytes) of a safetensors file's bytes; ValueError when there is no readable header."""
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or size > len(data) - 8:
        raise ValueError(f"a header of {size} bytes in a {len(data)}-byte file")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _content_digest(header: dict, body: bytes) -> str:
    """sha256 of everything a safetensors file holds but the digest itself: metadata, tensor layout, tensor bytes.
    (Tensor offsets are relative to the end of the header, so adding the digest to the metadata moves none.)"""
    metadata = {k: v for k, v in header.get("__metadata__", {}).items() if k != DIGEST_KEY}
    layout = {k: v for k, v in header.items() if k != "__metadata__"}
    return sha256_bytes(json.dumps({"metadata": metadata, "tensors": layout}, sort_keys=True).encode() + body)


def read_tagged_safetensors(path: str | Path, kind: str, schema_version: int) -> tuple[dict[str, str], dict]:
    """(metadata, tensors) of a safetensors artifact whose metadata says `kind` and `schema_version`.

    Every error names the file: unreadable or damaged (its content does not match the sha256 it was written with),
    another kind of artifact, another schema version.
    """
    try:
        header, body = _split(Path(path).read_bytes())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    recorded = header.get("__metadata__", {}).get(DIGEST_KEY)
    if recorded is not None and recorded != _content_digest(header, body):
        raise CorruptFileError(f"{path}: its content does not match the sha256 recorded when it was written (the file "
                               "was damaged, truncated or modified since)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    if metadata.get("kind") != kind:
        raise ValueError(f"{path}: metadata kind={metadata.get('kind')!r}, expected {kind!r}")
    if metadata.get("schema_version") != str(schema_version):
        raise ValueError(f"{path}: schema_version={metadata.get('schema_version')!r}, expected {schema_version}")
    return metadata, tensors


def check_recorded_fingerprint(metadata: dict[str, str], model_config, path: Path) -> dict[str, Any]:
    """Raise unless the file's recorded model fingerprint is `model_config`'s; returns the model's fingerprint."""
    actual = model_fingerprint(model_config)
    check_fingerprint(json.loads(metadata.get("fingerprint", "{}")), actual, path)
    return actual
