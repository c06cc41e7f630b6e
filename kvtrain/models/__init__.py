"""Models: the supported architectures and their shape, RoPE, loading by name or path, the embedded SmolLM2
checkpoint, tiny random models for tests."""

from __future__ import annotations

from kvtrain.models.embedded import EMBEDDED_MODELS, EMBEDDED_ORIGINS, KVTRAIN_HOME, embedded_model_dir, prepare_model
from kvtrain.models.loading import load_model, resolve_model
from kvtrain.models.shape import (
    SUPPORTED_MODEL_TYPES,
    ModelShape,
    check_fingerprint,
    check_supported,
    head_dim,
    model_fingerprint,
)
from kvtrain.models.tiny import tiny_model, tiny_tokenizer

__all__ = [
    "EMBEDDED_MODELS",
    "EMBEDDED_ORIGINS",
    "KVTRAIN_HOME",
    "SUPPORTED_MODEL_TYPES",
    "ModelShape",
    "check_fingerprint",
    "check_supported",
    "embedded_model_dir",
    "head_dim",
    "load_model",
    "model_fingerprint",
    "prepare_model",
    "resolve_model",
    "tiny_model",
    "tiny_tokenizer",
]
