"""Models: the supported architectures and their shape, RoPE, EOS ids, loading by name or path, the embedded
SmolLM2 checkpoint, tiny random models and tiny twins of the recipe models for tests."""

from __future__ import annotations

from kvtrain.models.embedded import EMBEDDED_MODELS, EMBEDDED_ORIGINS, KVTRAIN_HOME, embedded_model_dir, prepare_model
from kvtrain.models.generation import eos_token_ids
from kvtrain.models.loading import load_model, resolve_model
from kvtrain.models.shape import (
    SUPPORTED_MODEL_TYPES,
    ModelShape,
    check_fingerprint,
    check_positions,
    check_supported,
    head_dim,
    model_fingerprint,
    sliding_windows,
)
from kvtrain.models.tiny import tiny_model, tiny_tokenizer
from kvtrain.models.twins import REAL_MODELS, RECIPE_TWINS, twin_config, twin_model

__all__ = [
    "EMBEDDED_MODELS",
    "EMBEDDED_ORIGINS",
    "KVTRAIN_HOME",
    "REAL_MODELS",
    "RECIPE_TWINS",
    "SUPPORTED_MODEL_TYPES",
    "ModelShape",
    "check_fingerprint",
    "check_positions",
    "check_supported",
    "embedded_model_dir",
    "eos_token_ids",
    "head_dim",
    "load_model",
    "model_fingerprint",
    "prepare_model",
    "resolve_model",
    "sliding_windows",
    "tiny_model",
    "tiny_tokenizer",
    "twin_config",
    "twin_model",
]
