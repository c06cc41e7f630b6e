"""KVzip: the chunked reconstruction scores against one unchunked eager forward read through `output_attentions`,
the cache's prefill keep-sets against the top-k of those reference scores, and cache == replay parity."""

from __future__ import annotations

import pytest
import torch

from kvtrain.config import KVCompressionConfig, ScheduleConfig, ScorerConfig
from kvtrain.models import tiny_model
from kvtrain.policies.kvzip import kvzip_table, reconstruction_scores
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.decode import position_ids_from_mask, teacher_forced_decode
from kvtrain.runtime.replay import replay_compression

SEQ, PREFILL, BUDGET = 36, 30, 10
REPEAT = torch.tensor([5, 6, 7])


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", num_layers=2, hidden_size=96, num_heads=6, num_kv_heads=2, vocab_size=97, seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(8, 97, (2, SEQ), generator=torch.Generator().manual_seed(3))


def reference_scores(model, context: torch.Tensor) -> torch.Tensor:
    """[L, h_kv, n]: one eager forward over context + repeat + context, max over the reconstruction rows and the
    GQA group, written as plainly as possible."""
    n = context.shape[0]
    sequence = torch.cat([context, REPEAT, context])[None]
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(input_ids=sequence, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    h_kv = model.config.num_key_value_heads
    group = model.config.num_attention_heads // h_kv
    out = torch.zeros(len(attentions), h_kv, n)
    for layer, probs in enumerate(attentions):
        for head in range(model.config.num_attention_heads):
            reconstruction_rows = probs[0, head, n:, :n]  # the repeat prompt's and the copy's queries
            out[layer, head // group] = torch.maximum(out[layer, head // group], reconstruction_rows.amax(dim=0))
    return out


def kvzip_config() -> KVCompressionConfig:
    # No sinks and no recent window: the kept set is the reconstruction scores' top-k alone.
    return KVCompressionConfig(budget=BUDGET, sinks=0, recent=0, scorer=ScorerConfig("kvzip"), query_window=4,
                               schedule=ScheduleConfig(interval=1000))


def test_chunked_scores_match_unchunked_reference(llama, tokens):
    context = tokens[0, :PREFILL]
    expected = reference_scores(llama, context)
    for chunk in (7, 1000):
        got = reconstruction_scores(llama, context[None], None, REPEAT, chunk_size=chunk)[0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_left_padded_row_scores_like_unpadded(llama, tokens):
    mask = torch.ones(2, PREFILL, dtype=torch.long)
    mask[1, :4] = 0
    table = reconstruction_scores(llama, tokens[:, :PREFILL], mask, REPEAT, chunk_size=8)
    alone = reconstruction_scores(llama, tokens[1:, 4:PREFILL], None, REPEAT, chunk_size=8)
    torch.testing.assert_close(table[1, :, :, 4:], alone[0])
    assert (table[1, :, :, :4] == 0).all()


def test_prefill_keeps_reference_top_k_and_replay_matches(llama, tokens):
    config = kvzip_config()
    table = reconstruction_scores(llama, tokens[:, :PREFILL], None, REPEAT, chunk_size=8)
    cache = CompressedCache.for_model(llama, config, record=True)
    with kvzip_table(table):
        decoded = teacher_forced_decode(llama, cache, tokens, None, prefill_len=PREFILL)
        mask = torch.ones_like(tokens)
        with torch.no_grad(), replay_compression(llama, config, prefill_len=PREFILL, record=True) as replay:
            replayed = llama(input_ids=tokens, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                             use_cache=False).logits
    assert (decoded - replayed).abs().max().item() <= 1e-4
    for row in range(2):
        expected = reference_scores(llama, tokens[row, :PREFILL])
        for layer, events in enumerate(cache.records):
            kept = events[0].kept[row]  # the prefill event
            for head in range(kept.shape[0]):
                top = set(expected[layer, head].topk(BUDGET).indices.tolist())
                assert set(kept[head].tolist()) == top
            assert torch.equal(replay.records[layer][0].kept, events[0].kept)


def test_scorer_refuses_to_run_without_a_table(llama, tokens):
    cache = CompressedCache.for_model(llama, kvzip_config())
    with pytest.raises(ValueError, match="reconstruction scores"):
        teacher_forced_decode(llama, cache, tokens, None, prefill_len=PREFILL)
