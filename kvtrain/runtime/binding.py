"""Checking a `KVCompressionConfig` against the model it is bound to, before any token is processed.

A config validates on its own when it is loaded; what depends on the model (layer indices, head dimensions,
group sizes, the lengths of per-layer lists) is checked here, when the cache, the replay or a trainer builds
its compressors. Every error names the field, the value and what the model accepts.
"""

from __future__ import annotations

from kvtrain.config import ConfigError, KVCompressionConfig
from kvtrain.models.shape import ModelShape
from kvtrain.runtime.codecs import ChainCodec, Codec, LowRankCodec, TadaCodec


def check_config_for_model(config: KVCompressionConfig, model_config) -> None:
    shape = ModelShape.of(model_config)
    last = shape.num_layers - 1

    def fail(name: str, value, why: str) -> None:
        raise ConfigError(f"compression config: field {name!r} = {value!r}: {why}")

    outside = [i for i in config.dense_layers if i > last]
    if outside:
        fail("dense_layers", config.dense_layers, f"layers {outside} do not exist: the model has layers 0..{last}")
    outside = sorted(i for i in config.layers if not 0 <= i <= last)
    if outside:
        fail("layers", outside, f"overrides for layers the model does not have: it has layers 0..{last}")
    if isinstance(config.layer_budgets, list) and len(config.layer_budgets) != shape.num_layers:
        fail("layer_budgets", config.layer_budgets, f"{len(config.layer_budgets)} budgets for {shape.num_layers} layers")
    if config.lowrank is not None:
        for name in ("key_rank", "value_rank"):
            rank = getattr(config.lowrank, name)
            if rank is not None and rank > shape.head_dim:
                fail(f"lowrank.{name}", rank, f"must be at most the head dimension {shape.head_dim}")


def check_codec_dims(codecs: list, model_config, config: KVCompressionConfig) -> None:
    """Every TaDA group must divide the vectors it quantises: the head dimension, or the low-rank rank."""
    head_dim = ModelShape.of(model_config).head_dim
    for layer, pair in enumerate(codecs):
        for side, codec in (("keys", pair.keys), ("values", pair.values)):
            width, tada = _quantised_width(codec, head_dim)
            if tada is not None and width % tada.group_size:
                source = config.quant.plan or "quant.group_size"
                raise ConfigError(
                    f"compression config: {source}: group size {tada.group_size} does not divide the {width} "
                    f"numbers per token that layer {layer} quantises for its {side} "
                    f"({'low-rank coefficients' if width != head_dim else 'head dimension'}); use a divisor of {width}"
                )


def _quantised_width(codec: Codec | None, head_dim: int) -> tuple[int, TadaCodec | None]:
    if isinstance(codec, ChainCodec):
        return codec.inner.pair.rank, codec.outer
    if isinstance(codec, TadaCodec):
        return head_dim, codec
    if isinstance(codec, LowRankCodec) or codec is None:
        return head_dim, None
    raise TypeError(f"unknown codec {type(codec).__name__}")
