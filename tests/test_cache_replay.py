"""CompressedCache in decoding vs replay in one teacher-forced forward, and both vs independent references."""

from __future__ import annotations

import pytest
import torch

from kvtrain.config import KVCompressionConfig, MergeConfig, ScheduleConfig, ScorerConfig
from kvtrain.models import tiny_model
from kvtrain.policies import SCORERS
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.decode import position_ids_from_mask, teacher_forced_decode
from kvtrain.runtime.replay import replay_compression

SEQ, PREFILL = 70, 40


def make_config(scorer: str, **overrides) -> KVCompressionConfig:
    fields = dict(
        budget=20,
        sinks=2,
        recent=4,
        scorer=ScorerConfig(scorer),
        query_window=8,
        schedule=ScheduleConfig(interval=8),
    )
    fields.update(overrides)
    return KVCompressionConfig(**fields)


def run_both(model, config, input_ids, attention_mask=None, prefill_len=PREFILL):
    cache = CompressedCache.for_model(model, config, record=True)
    decoded = teacher_forced_decode(model, cache, input_ids, attention_mask, prefill_len=prefill_len)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    with torch.no_grad(), replay_compression(model, config, prefill_len=prefill_len, record=True) as replay:
        replayed = model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
        ).logits
    return cache, decoded, replay, replayed


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", num_layers=2, hidden_size=96, num_heads=6, num_kv_heads=2, vocab_size=97, seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (1, SEQ), generator=torch.Generator().manual_seed(1))


SCORER_CASES = [
    ("streaming", {}),
    ("h2o", {"query_window": 8}),
    ("snapkv", {}),
    ("tova", {}),
    ("key_norm", {}),
    ("value_norm", {}),
    ("expected_attention", {}),
    ("gkv", {}),
    ("gate", {}),
    ("gkv", {"selection": "per_layer"}),
    ("snapkv", {"selection": "head_adaptive"}),
    ("h2o", {"merge": MergeConfig(threshold=0.0), "query_window": 8}),
    ("snapkv", {"fair_spans": [(0, 20), (20, 40)]}),
    ("snapkv", {"whitelist": [(10, 14)]}),
    ("tova", {"schedule": ScheduleConfig(interval=8, prefill_chunk=16)}),
    ("expected_attention", {"compression_ratio": 0.5, "budget": None}),
]


@pytest.mark.parametrize("scorer,overrides", SCORER_CASES, ids=[f"{s}-{'-'.join(o) or 'default'}" for s, o in SCORER_CASES])
def test_replay_logits_equal_decode_logits(llama, tokens, scorer, overrides):
    config = make_config(scorer, **overrides)
    cache, decoded, replay, replayed = run_both(llama, config, tokens)
    assert (decoded - replayed).abs().max().item() <= 1e-4
    # Compression really happened, and both paths kept the same positions at every event.
    assert all(len(layer) >= 2 for layer in cache.records)
    for cache_layer, replay_layer in zip(cache.records, replay.records):
        assert [r.tokens_seen for r in cache_layer] == [r.tokens_seen for r in replay_layer]
        for a, b in zip(cache_layer, replay_layer):
            assert torch.equal(a.kept, b.kept)


def test_every_registered_scorer_is_covered_by_parity():
    # kvzip needs its reconstruction table around both paths: its parity is in tests/test_kvzip.py.
    assert {name for name, _ in SCORER_CASES} == set(SCORERS) - {"kvzip"}


def test_compression_changes_the_logits(llama, tokens):
    """Guards the parity test against a replay and a cache that both silently stopped compressing."""
    config = make_config("snapkv")
    _, decoded, _, _ = run_both(llama, config, tokens)
    with torch.no_grad():
        full = llama(input_ids=tokens).logits
    assert torch.allclose(decoded[:, :PREFILL], full[:, :PREFILL], atol=1e-4)  # prefill attends everything
    assert (decoded[:, PREFILL:] - full[:, PREFILL:]).abs().max() > 1e-3


def streaming_reference_mask(seq, prefill, budget, sinks, interval):
    """Dense visibility of StreamingLLM under our schedule, from its closed form (no kvtrain code)."""
    events = [prefill] + list(range(prefill + interval, seq, interval))
    visible = torch.zeros(seq, seq, dtype=torch.bool)
    kept = None
    for i in range(seq):
        last = max([e for e in events if e <= i], default=None)
        if last is None:
            visible[i, : i + 1] = True
            continue
        kept = set(range(sinks)) | set(range(last - (budget - sinks), last))
        for j in kept:
            visible[i, j] = True
        visible[i, last : i + 1] = True
    return visible


def test_streaming_cache_matches_explicit_dense_mask(llama, tokens):
    config = make_config("streaming", budget=12, sinks=3, recent=2)
    cache = CompressedCache.for_model(llama, config)
    decoded = teacher_forced_decode(llama, cache, tokens, prefill_len=PREFILL)
    visible = streaming_reference_mask(SEQ, PREFILL, budget=12, sinks=3, interval=8)
    bias = torch.zeros(SEQ, SEQ).masked_fill(~visible, float("-inf"))[None, None]
    llama.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            reference = llama(input_ids=tokens, attention_mask=bias).logits
    finally:
        llama.set_attn_implementation("kvtrain")
    assert (decoded - reference).abs().max().item() <= 1e-4


def test_budget_protection_and_monotone_positions(llama, tokens):
    config = make_config("snapkv", budget=16, sinks=3, recent=5)
    cache, *_ = run_both(llama, config, tokens)
    for layer in cache.records:
        for record in layer:
            kept = record.kept[0]  # [h_kv, k]
            for head in kept:
                real = head[head >= 0]
                assert real.numel() <= 16
                assert torch.all(real[1:] > real[:-1])
                assert set(range(3)) <= set(real.tolist())
                assert set(range(record.tokens_seen - 5, record.tokens_seen)) <= set(real.tolist())
    assert all(int(n.max()) <= 16 + 8 for n in cache.stored_tokens())


@pytest.mark.parametrize("scorer", ["snapkv", "expected_attention", "gkv"])
def test_left_padded_batch_equals_per_sample_runs(llama, scorer):
    gen = torch.Generator().manual_seed(3)
    long_row = torch.randint(0, 97, (SEQ,), generator=gen)
    short_row = torch.randint(0, 97, (SEQ - 6,), generator=gen)
    batch = torch.stack([long_row, torch.cat([torch.zeros(6, dtype=torch.long), short_row])])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    config = make_config(scorer)
    cache = CompressedCache.for_model(llama, config)
    batched = teacher_forced_decode(llama, cache, batch, mask, prefill_len=PREFILL)
    solo_long = teacher_forced_decode(llama, CompressedCache.for_model(llama, config), long_row[None], prefill_len=PREFILL)
    solo_short = teacher_forced_decode(
        llama, CompressedCache.for_model(llama, config), short_row[None], prefill_len=PREFILL - 6
    )
    assert (batched[0] - solo_long[0]).abs().max().item() <= 1e-4
    assert (batched[1, 6:] - solo_short[0]).abs().max().item() <= 1e-4


def test_generate_runs_with_compressed_cache_and_left_padding(llama):
    prompts = torch.randint(1, 97, (2, 30), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(prompts)
    mask[1, :7] = 0
    config = make_config("gkv", budget=16)
    cache = CompressedCache.for_model(llama, config)
    out = llama.generate(
        input_ids=prompts, attention_mask=mask, past_key_values=cache, max_new_tokens=20, do_sample=False, pad_token_id=0
    )
    assert out.shape == (2, 50)
    assert cache.get_seq_length() == 49  # the last generated token is never fed back
    assert all(int(n.max()) <= 16 + 8 for n in cache.stored_tokens())


def test_cache_requires_the_kvtrain_attention(llama, tokens):
    cache = CompressedCache.for_model(llama, make_config("snapkv"))
    llama.set_attn_implementation("sdpa")
    try:
        with pytest.raises(RuntimeError, match="attn_implementation='kvtrain'"):
            llama(input_ids=tokens[:, :10], past_key_values=cache)
            llama(input_ids=tokens[:, 10:11], past_key_values=cache)
    finally:
        llama.set_attn_implementation("kvtrain")


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "qwen3"])
def test_parity_on_other_architectures(arch, tokens):
    model = tiny_model(arch, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=97, seed=2)
    _, decoded, _, replayed = run_both(model, make_config("gkv"), tokens)
    assert (decoded - replayed).abs().max().item() <= 1e-4
