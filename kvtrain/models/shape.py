"""What kvtrain needs to know about a model's shape, in one place: the supported architectures, the attention
shape (`ModelShape`), and the fingerprint that artifacts record so they are never applied to another model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from kvtrain.errors import UserError
from kvtrain.models.rope import rope_theta

# These architectures compute post-RoPE keys, call `past_key_values.update` and then the registered
# attention function, which is exactly where the compressed cache and replay hook in.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_supported(config: PretrainedConfig) -> None:
    """Raise UserError unless the architecture is one the compressed cache and replay hook into."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"unsupported architecture: model_type={model_type!r}, architectures={getattr(config, 'architectures', None)}; "
            f"kvtrain supports model types {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def sliding_windows(config: PretrainedConfig) -> list[int | None]:
    """Per layer, the sliding window (keys a query may see, itself included) or None for full attention.

    transformers 5 gives Qwen2/Qwen3 a per-layer `layer_types` list ("sliding_attention" / "full_attention") and
    gives Mistral one `sliding_window` for every layer (null on Mistral >= v0.2).
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    return [window] * int(config.num_hidden_layers)


def check_window(window: int | None, layer: int, columns: int, where: str) -> None:
    """Refuse a sequence of `columns` tokens (padding included) that reaches past sliding-window layer `layer`'s
    `window` (None: a full-attention layer, never refused).

    kvtrain's cache and replay attend every kept token, as full attention does, so a sliding-window layer is exact
    only while its window covers the whole sequence; beyond it the layer is refused by name rather than silently
    attending tokens the model would not see.
    """
    if window is not None and columns > window:
        raise UserError(
            f"{where}: layer {layer} is a sliding-window layer (sliding_window={window}) and the sequence reaches "
            f"{columns} tokens: kvtrain's cache and replay attend every kept token and do not honour windows; keep "
            f"sequences within {window} tokens"
        )


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class ModelShape:
    """The attention shape of a model: what the cache, replay, calibration and artifacts size themselves by."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def of(cls, model_or_config) -> ModelShape:
        """The shape of a model, or of its transformers config."""
        config = getattr(model_or_config, "config", model_or_config)
        return cls(
            num_layers=int(config.num_hidden_layers),
            num_heads=int(config.num_attention_heads),
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
            head_dim=int(head_dim(config)),
            rope_theta=rope_theta(config),
        )


def check_positions(config: PretrainedConfig, n_tokens: int, what: str) -> None:
    """Refuse `n_tokens` positions beyond the model's `max_position_embeddings`; `what` names where they come from."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and n_tokens > limit:
        raise UserError(f"{what} = {n_tokens} tokens exceeds the model's max_position_embeddings = {limit}")


def model_fingerprint(config: PretrainedConfig) -> dict[str, Any]:
    """The shape-defining fields of a model config plus ``hash``: sha256 of their sorted JSON.

    Calibration artifacts store this and refuse to load onto a model whose fingerprint differs.
    """
    shape = ModelShape.of(config)
    fields: dict[str, Any] = {
        "model_type": config.model_type,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "rope_theta": shape.rope_theta,
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return {**fields, "hash": digest}


def check_fingerprint(recorded: dict[str, Any], actual: dict[str, Any], source: str | Path) -> None:
    """Raise ValueError naming the fingerprint fields that differ between artifacts and a model."""
    differing = [f for f in sorted(set(recorded) | set(actual)) if f != "hash" and recorded.get(f) != actual.get(f)]
    if differing:
        details = ", ".join(f"{f}: {recorded.get(f)!r} in the artifacts, {actual.get(f)!r} for this model" for f in differing)
        raise UserError(f"{source}: made for a different model (model_fingerprint differs: {details})")
    if recorded.get("hash") != actual.get("hash"):
        raise UserError(f"{source}: model_fingerprint hash differs from this model's")
