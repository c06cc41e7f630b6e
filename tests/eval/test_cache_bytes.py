"""Where the cache's bytes go: parts add up to `nbytes()`, match hand-computed TaDA sizes, and the 8x arithmetic."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvtrain import CompressedCache, KVCompressionConfig
from kvtrain.artifacts.projections import LowRankPair
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
    # per layer (2): int64 positions of 8 slots x 2 heads and one left-pad count, validity and history flags (bool)
    # of 8 slots x 2 heads, the scorer's window of 4 fp32 queries x 4 query heads x 16 dims
    assert measured.bookkeeping_parts == {"positions": 2 * (2 * 8 + 1) * 8 / SEEN, "validity": 2 * 2 * 8 * 2 / SEEN,
                                          "query_window": 2 * 4 * 4 * 16 * 4 / SEEN}


def test_reduction_scenarios_arithmetic():
    rows = {r["scenario"]: r for r in reduction_scenarios(kv_heads=3, head_dim=64)}
    tada4 = rows["TaDA 4-bit (fp16 mean per token)"]
    assert tada4["bits_per_element"] == pytest.approx(4 + 2 * 16 / 32 + 16 / 3)  # codes, scale+zero, mean
    assert tada4["reduction"] == pytest.approx(16 / (31 / 3))
    assert rows["TaDA 4-bit + 50% eviction"]["fraction_of_16bit"] == pytest.approx(31 / 3 / 16 / 2)
    assert rows["rank 16 of 64, 16-bit coefficients + 50% eviction"]["reduction"] == pytest.approx(8.0)
    assert rows["4-bit without a mean + 50% eviction"]["reduction"] == pytest.approx(6.4)


def _reachable_storage_bytes(root) -> int:
    """Independent reference: every tensor reachable from `root` through attributes, containers and closures
    (the model's modules aside: weights are not the cache's), each storage counted once at its full size."""
    storages: dict[int, int] = {}
    stack, visited = [root], set()
    while stack:
        obj = stack.pop()
        if id(obj) in visited or isinstance(obj, (torch.nn.Module, type)):
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
            continue
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        else:
            stack.extend(getattr(obj, "__dict__", {}).values())
            stack.append(getattr(obj, "__self__", None))
            stack.extend(cell.cell_contents for cell in getattr(obj, "__closure__", None) or ())
    return sum(storages.values())


@pytest.mark.parametrize("overrides", [
    {},  # SnapKV eviction, full precision: positions, validity, query window
    {"scorer": {"name": "h2o"}, "query_window": 8},  # scorer state carried between events
    {"merge": {"ema_alpha": 0.5}},  # KeepKV: merge votes
    {"quant": {"key_bits": 4, "value_bits": 4, "group_size": 16}},  # TaDA: codes, scales, means
    {"lowrank": {"projections": "/never/read.safetensors"},  # low-rank coefficients, TaDA-coded; fixed projections
     "quant": {"key_bits": 4, "value_bits": 4, "group_size": 8}},
])
def test_every_tensor_the_cache_holds_is_counted(tiny, overrides):
    model, _ = tiny
    projections = None
    if "lowrank" in overrides:  # supplied pairs replace the file: 2 layers, 2 KV heads, 16 dims, rank 8
        g = torch.Generator().manual_seed(0)
        pair = lambda: LowRankPair(torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g),
                                   torch.ones(2, 16, dtype=torch.float64))
        projections = ([pair(), pair()], [pair(), pair()])
    cache = CompressedCache.for_model(model, evict_config(**overrides), record=True, projections=projections)
    prefilled(model, cache)
    with torch.no_grad():  # a few decode steps, past an event (interval 8)
        for token in range(9):
            model(input_ids=torch.tensor([[5 + token]]), past_key_values=cache, use_cache=True)
    measured = cache_bytes(cache, model.config)
    per = measured.tokens_seen  # one row
    reported = (measured.total_held + measured.bookkeeping) * per + measured.fixed_bytes
    assert reported == pytest.approx(_reachable_storage_bytes(cache), rel=1e-12)
    assert measured.bookkeeping_parts["positions"] > 0 and measured.bookkeeping_parts["validity"] > 0
    assert measured.bookkeeping_parts["query_window"] > 0 and measured.bookkeeping_parts["records"] > 0
    # a and b (2 x 16 x 8 fp32) and the float64 spectrum (2 x 16) of 4 pairs, when supplied
    assert measured.fixed_bytes == (4 * (2 * 1024 + 256) if projections else 0)
