"""Replay == step-by-step decode on the real SmolLM2-135M, for every registered policy (slow: real model)."""

from __future__ import annotations

import pytest
import torch

from kvtrain.config import KVCompressionConfig, MergeConfig, ScheduleConfig, ScorerConfig
from kvtrain.data import load_texts, token_blocks
from kvtrain.policies import SCORERS
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.decode import teacher_forced_decode
from kvtrain.runtime.replay import replay_compression

pytestmark = pytest.mark.slow

PREFILL, SEQ = 96, 128


@pytest.fixture(scope="module")
def tokens(smollm2):
    _, tokenizer = smollm2
    return token_blocks(tokenizer, load_texts(None, split="heldout"), SEQ, n_blocks=1)


# kvzip needs its reconstruction table around both paths: its parity is in tests/test_kvzip.py.
CASES = [(name, {}) for name in sorted(SCORERS) if name != "kvzip"] + [("snapkv", {"merge": MergeConfig()})]


@pytest.mark.parametrize("scorer,extra", CASES, ids=[n + ("+keepkv" if e else "") for n, e in CASES])
def test_replay_equals_decode_on_smollm2(smollm2, tokens, scorer, extra):
    model, _ = smollm2
    config = KVCompressionConfig(
        budget=48, sinks=4, recent=8, scorer=ScorerConfig(scorer), query_window=16, schedule=ScheduleConfig(interval=16), **extra
    )
    cache = CompressedCache.for_model(model, config, record=True)
    decoded = teacher_forced_decode(model, cache, tokens, prefill_len=PREFILL)
    with torch.no_grad(), replay_compression(model, config, prefill_len=PREFILL):
        replayed = model(input_ids=tokens, use_cache=False).logits
    # Prefill, then every 16 decode steps; the last event (after the final token) precedes no query.
    assert [r.tokens_seen for r in cache.records[0]] == [96, 112, 128]
    assert (decoded - replayed).abs().max().item() <= 1e-4
