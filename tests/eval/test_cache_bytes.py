"""Where the cache's bytes go: parts add up to `nbytes()`, match hand-computed TaDA sizes, and the 8x arithmetic."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvtrain import CompressedCache, KVCompressionConfig
from kvtrain.eval.cache_bytes import cache_bytes, reduction_scenarios, tada_bits_per_element
from tests.eval.conftest import evict_config

SEEN = 16


def prefilled(model, cache):
    ids = torch.arange(4, 4 + SEEN)[None]
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return cache


def test_dynamic_cache_is_the_16bit_reference(tiny):
    model, _ = tiny
    measured = cache_bytes(prefilled(model, DynamicCache()), model.config)
    # 2 (K, V) x 2 layers x 2 KV heads x 16 dims: 128 numbers per token, fp32 held, 2 bytes at 16 bits
    assert measured.full16 == 256 and measured.total_held == 512 and measured.total_at16 == 256
    assert measured.fraction == 1.0 and measured.bookkeeping == 0


def test_tada_parts_by_hand(tiny):
    model, _ = tiny
    config = KVCompressionConfig.from_dict({"budget": None, "compression_ratio": 0.0, "selection": "per_layer",
                                            "quant": {"key_bits": 4, "value_bits": 4, "group_size": 16}})
    cache = prefilled(model, CompressedCache.for_model(model, config))
    measured = cache_bytes(cache, model.config)
    # per token, side and layer: fp16 mean 16 x 2 = 32 B; codes 2 heads x 16 x 4 bits = 16 B; fp16 scale and zero
    # per 16-element group: 2 heads x 2 x 2 B = 8 B. Two sides, two layers.
    assert measured.at16 == {"means": 128, "codes": 64, "scales": 32, "residual": 0}
    assert measured.total_held == cache.nbytes() / SEEN == 224
    assert measured.fraction == pytest.approx(tada_bits_per_element(4, 16, 2) / 16) == 0.875


def test_eviction_keeps_half_and_bookkeeping_is_apart(tiny):
    model, _ = tiny
    cache = prefilled(model, CompressedCache.for_model(model, evict_config(compression_ratio=0.5)))
    measured = cache_bytes(cache, model.config)
    assert measured.total_held == cache.nbytes() / SEEN  # the parts add up to what the cache reports
    assert set(measured.at16) == {"residual"} and measured.fraction == 0.5  # 8 of 16 tokens, full precision
    # positions (int64), validity and history flags (bool) for 8 slots x 2 heads x 2 layers
    assert measured.bookkeeping == pytest.approx(2 * 2 * 8 * (8 + 1 + 1) / SEEN)


def test_reduction_scenarios_arithmetic():
    rows = {r["scenario"]: r for r in reduction_scenarios(kv_heads=3, head_dim=64)}
    tada4 = rows["TaDA 4-bit (fp16 mean per token)"]
    assert tada4["bits_per_element"] == pytest.approx(4 + 2 * 16 / 32 + 16 / 3)  # codes, scale+zero, mean
    assert tada4["reduction"] == pytest.approx(16 / (31 / 3))
    assert rows["TaDA 4-bit + 50% eviction"]["fraction_of_16bit"] == pytest.approx(31 / 3 / 16 / 2)
    assert rows["rank 16 of 64, 16-bit coefficients + 50% eviction"]["reduction"] == pytest.approx(8.0)
    assert rows["4-bit without a mean + 50% eviction"]["reduction"] == pytest.approx(6.4)
