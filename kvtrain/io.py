"""Atomic file writes (a reader never sees a half-written file, and a killed writer leaves the old one), and
reading back the tagged safetensors files kvtrain writes as artifacts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_tagged_safetensors(path: str | Path, kind: str, schema_version: int) -> tuple[dict[str, str], dict]:
    """(metadata, tensors) of a safetensors artifact whose metadata says `kind` and `schema_version`.

    Every error names the file: unreadable or damaged, another kind of artifact, another schema version.
    """
    from safetensors import safe_open

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
