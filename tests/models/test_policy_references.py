"""The compressed cache against an independent model-level reference (tests/models/reference.py: plain eager
attention with per-head masks, scores from the explicit attention probabilities and the projections' outputs).

The parity tests compare the cache with replay, and both call the same compressor: a wrong input to a policy
(which queries, which keys, which positions) passes them. These compare what the cache kept at every event,
prefill and decode, and its logits, with a reference that shares no code with kvtrain's runtime, on the
Llama-3.1 twin (llama3 RoPE scaling, GQA 4:1) and the Qwen3 twin (q/k norms, head_dim != hidden / heads).
"""

from __future__ import annotations

import pytest
import torch

from kvtrain.config import KVCompressionConfig, ScheduleConfig, ScorerConfig
from kvtrain.models import twin_model
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.decode import teacher_forced_decode

from .reference import Policy, reference_eviction

SEQ, PREFILL = 40, 24  # events at 24 (prefill), 28, 32 and 36 (decode)
POLICIES = {
    "snapkv": Policy("snapkv", budget=12, sinks=2, recent=2, query_window=4, interval=4),
    "h2o": Policy("h2o", budget=12, sinks=2, recent=2, query_window=4, interval=4),
    "tova": Policy("tova", budget=12, sinks=2, recent=2, query_window=4, interval=4),
    "gkv": Policy("gkv", budget=12, sinks=2, recent=2, query_window=4, interval=4),
    "expected_attention": Policy("expected_attention", budget=12, sinks=2, recent=2, query_window=4, interval=4),
}
CASES = [(twin, scorer) for twin in ("llama-3.1-8b-instruct", "qwen3-0.6b") for scorer in POLICIES]


def kv_config(policy: Policy) -> KVCompressionConfig:
    return KVCompressionConfig(
        budget=policy.budget, sinks=policy.sinks, recent=policy.recent, query_window=policy.query_window,
        scorer=ScorerConfig(policy.scorer, dict(policy.params)), schedule=ScheduleConfig(interval=policy.interval),
    )


@pytest.fixture(scope="module")
def twins():
    return {}


@pytest.mark.parametrize(("twin", "scorer"), CASES, ids=[f"{t}-{s}" for t, s in CASES])
def test_cache_keeps_what_the_eager_reference_keeps(twins, twin, scorer):
    if twin not in twins:
        twins[twin] = twin_model(twin, seed=3)
    model = twins[twin]
    ids = torch.randint(0, 1000, (1, SEQ), generator=torch.Generator().manual_seed(11))
    policy = POLICIES[scorer]
    reference = reference_eviction(model, ids, PREFILL, policy)

    cache = CompressedCache.for_model(model, kv_config(policy), record=True)
    logits = teacher_forced_decode(model, cache, ids, prefill_len=PREFILL)

    for layer, (records, want) in enumerate(zip(cache.records, reference.events)):
        got = [r for r in records if r.tokens_seen < SEQ]  # the event after the last token changes no logit
        assert [r.tokens_seen for r in got] == [t for t, _ in want] == [24, 28, 32, 36]
        for record, (seen, heads) in zip(got, want):
            kept = [[int(p) for p in head if p >= 0] for head in record.kept[0]]
            assert kept == heads, f"layer {layer}, event at {seen} tokens"
    torch.testing.assert_close(logits[0], reference.logits, rtol=0, atol=1e-4)
    with torch.no_grad():
        full = model(input_ids=ids).logits[0]
    assert (logits[0, PREFILL:] - full[PREFILL:]).abs().max() > 1e-3  # eviction changed what decoding saw
