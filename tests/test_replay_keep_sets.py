"""Replay with recorded keep-sets (`replay_compression(..., keep_sets=cache.records, codes=cache.codes)`): the
forward attends exactly what the sampling cache kept, for every policy and composition, against the step-by-step
decode, against a dense mask built from arbitrary keep-sets, and after the weights changed; quantised archives hold
the codes the cache recorded; records that do not fit are refused."""

from __future__ import annotations

import pytest
import torch

from kvtrain.config import MergeConfig, QuantConfig, ScheduleConfig
from kvtrain.models import tiny_model
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.compressor import EventRecord
from kvtrain.runtime.decode import position_ids_from_mask, teacher_forced_decode
from kvtrain.runtime.replay import replay_compression
from kvtrain.runtime.schedule import event_points
from kvtrain.training.grpo.rollouts import KeepSetBatch
from tests.test_cache_replay import PREFILL, SEQ, make_config


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", num_layers=2, hidden_size=96, num_heads=6, num_kv_heads=2, vocab_size=97, seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (2, SEQ), generator=torch.Generator().manual_seed(11))


def decode_with_records(model, config, tokens, mask=None):
    cache = CompressedCache.for_model(model, config, record=True)
    logits = teacher_forced_decode(model, cache, tokens, mask, prefill_len=PREFILL)
    return logits, cache.records, cache.codes


def replayed(model, config, tokens, mask=None, keep_sets=None, record=False, codes=None):
    mask = torch.ones_like(tokens) if mask is None else mask
    with torch.no_grad(), replay_compression(model, config, prefill_len=PREFILL, keep_sets=keep_sets,
                                             record=record, codes=codes) as replay:
        logits = model(input_ids=tokens, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return logits, replay.records


CASES = [
    ("gkv", {}),
    ("snapkv", {"selection": "head_adaptive"}),
    ("h2o", {"merge": MergeConfig(threshold=0.0), "query_window": 8}),  # KeepKV merging
    ("gkv", {"quant": QuantConfig(key_bits=None, value_bits=4, group_size=16), "selection": "per_layer"}),
    ("tova", {"schedule": ScheduleConfig(interval=8, prefill_chunk=16)}),
]


@pytest.mark.parametrize("scorer,overrides", CASES, ids=[f"{s}-{'-'.join(o) or 'default'}" for s, o in CASES])
def test_recorded_keep_sets_reproduce_decode(llama, tokens, scorer, overrides):
    config = make_config(scorer, **overrides)
    decoded, records, codes = decode_with_records(llama, config, tokens)
    logits, replay_records = replayed(llama, config, tokens, keep_sets=records, record=True, codes=codes)
    assert (decoded - logits).abs().max().item() <= 1e-4
    assert all(len(layer) >= 3 for layer in records)  # prefill and decode-time events really evicted
    for cache_layer, replay_layer in zip(records, replay_records):
        assert [r.tokens_seen for r in cache_layer] == [r.tokens_seen for r in replay_layer]
        for a, b in zip(cache_layer, replay_layer):
            assert torch.equal(a.kept, b.kept)


def random_keep_sets(seq, prefill, interval, budget, heads, rows, seed):
    """Arbitrary keep-sets (not any policy's choice) that respect the schedule: at each event, `budget` positions
    per (row, head) drawn among the previous keep-set and the tokens since it."""
    gen = torch.Generator().manual_seed(seed)
    points = event_points(ScheduleConfig(interval=interval), prefill, seq)
    events = []
    for r in range(rows):
        kept = [list() for _ in range(heads)]
        start = 0
        for p_idx, point in enumerate(points):
            for h in range(heads):
                pool = sorted(set(kept[h]) | set(range(start, point)))
                pick = torch.randperm(len(pool), generator=gen)[:budget]
                kept[h] = sorted(pool[i] for i in pick.tolist())
            start = point
            if r == 0:
                events.append([])
            events[p_idx].append([list(k) for k in kept])
    return points, events


def dense_visibility(points, events, seq, row, head):
    """[S, S] bool: row i sees the keep-set of the last event <= i plus the causal tokens since that event."""
    visible = torch.zeros(seq, seq, dtype=torch.bool)
    for i in range(seq):
        last = max([k for k, p in enumerate(points) if p <= i], default=None)
        if last is None:
            visible[i, : i + 1] = True
            continue
        visible[i, events[last][row][head]] = True
        visible[i, points[last] : i + 1] = True
    return visible


def test_arbitrary_keep_sets_equal_a_dense_mask(llama, tokens):
    """The replay of given keep-sets against an explicit dense mask run through SDPA (no kvtrain attention)."""
    budget, interval, heads = 12, 8, 2
    config = make_config("snapkv", budget=budget, sinks=0, recent=0, schedule=ScheduleConfig(interval=interval))
    points, events = random_keep_sets(SEQ, PREFILL, interval, budget, heads, rows=2, seed=5)
    keep_sets = [[EventRecord(p, torch.tensor(events[e])) for e, p in enumerate(points)] for _ in range(2)]
    logits, _ = replayed(llama, config, tokens, keep_sets=keep_sets)
    # One visibility per (row, KV head); SDPA takes one mask per (row, query head): GQA group g of head h.
    group = llama.config.num_attention_heads // heads
    masks = torch.stack([
        torch.stack([dense_visibility(points, events, SEQ, r, h // group) for h in range(llama.config.num_attention_heads)])
        for r in range(2)
    ])
    bias = torch.zeros(masks.shape).masked_fill(~masks, float("-inf"))
    llama.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            reference = llama(input_ids=tokens, attention_mask=bias).logits
    finally:
        llama.set_attn_implementation("kvtrain")
    assert (logits - reference).abs().max().item() <= 1e-4
    with torch.no_grad():
        full = llama(input_ids=tokens).logits
    assert (logits[:, PREFILL:] - full[:, PREFILL:]).abs().max().item() > 1e-2  # the keep-sets mattered


def test_after_a_weight_change_the_recorded_sets_still_rule(tokens):
    """Selection recomputed with moved weights keeps other positions; the recorded keep-sets do not move."""
    model = tiny_model("llama", num_layers=2, hidden_size=96, num_heads=6, num_kv_heads=2, vocab_size=97, seed=0)
    config = make_config("gkv")
    _, records, _ = decode_with_records(model, config, tokens)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "k_proj" in name or "q_proj" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.2)
    decoded_moved, *_ = decode_with_records(model, config, tokens)  # the moved model's own sampling cache
    _, reselected = replayed(model, config, tokens, record=True)
    forced, forced_records = replayed(model, config, tokens, keep_sets=records, record=True)
    assert any(not torch.equal(a.kept, b.kept) for la, lb in zip(records, reselected) for a, b in zip(la, lb))
    for la, lb in zip(records, forced_records):
        assert all(torch.equal(a.kept, b.kept) for a, b in zip(la, lb))
    assert (forced - decoded_moved)[:, PREFILL:].abs().max().item() > 1e-3  # it is not the moved policy's cache


def test_a_row_masked_after_its_end_keeps_its_slots_empty(llama, tokens):
    """A row whose tail is masked out in training (tokens after its EOS) replays its recorded sets up to there."""
    config = make_config("gkv")
    decoded, records, _ = decode_with_records(llama, config, tokens)
    mask = torch.ones_like(tokens)
    mask[1, PREFILL + 12 :] = 0
    logits, _ = replayed(llama, config, tokens, mask=mask, keep_sets=records)
    assert (decoded[:, : PREFILL + 12] - logits[:, : PREFILL + 12]).abs().max().item() <= 1e-4
    assert (decoded[0] - logits[0]).abs().max().item() <= 1e-4


def test_shorter_forward_ignores_later_events(llama, tokens):
    config = make_config("gkv")
    decoded, records, _ = decode_with_records(llama, config, tokens)
    cut = PREFILL + 20
    logits, _ = replayed(llama, config, tokens[:, :cut], keep_sets=records)
    assert (decoded[:, :cut] - logits).abs().max().item() <= 1e-4


def _records(llama, tokens, config=None):
    return decode_with_records(llama, config or make_config("gkv"), tokens)[1]


def test_records_of_another_prefill_are_refused(llama, tokens):
    records = _records(llama, tokens)
    shifted = [[EventRecord(r.tokens_seen + 1, r.kept) for r in layer] for layer in records]
    with pytest.raises(ValueError, match=r"layer 0: a keep-set recorded at 41 tokens seen, which is not an event"):
        replayed(llama, make_config("gkv"), tokens, keep_sets=shifted)


def test_a_kept_position_that_was_evicted_earlier_is_refused(llama, tokens):
    records = _records(llama, tokens)
    first = records[0][0].kept
    gone = sorted(set(range(PREFILL)) - set(first[0, 0].tolist()))[0]
    second = records[0][1].kept.clone()
    second[0, 0, 0] = gone
    broken = [[records[0][0], EventRecord(records[0][1].tokens_seen, second), *records[0][2:]], records[1]]
    with pytest.raises(ValueError, match=rf"layer 0: .* keeps position {gone}, which this layer no longer stores"):
        replayed(llama, make_config("gkv"), tokens, keep_sets=broken)


def test_a_missing_record_while_over_budget_is_refused(llama, tokens):
    records = _records(llama, tokens)
    with pytest.raises(ValueError, match=r"layer 1: no recorded keep-set for the event at 40 tokens seen"):
        replayed(llama, make_config("gkv"), tokens, keep_sets=[records[0], records[1][1:]])


def test_wrong_rows_layers_and_dense_layers_are_refused(llama, tokens):
    records = _records(llama, tokens)
    with pytest.raises(ValueError, match="keep-sets recorded for 2 rows, the forward has 1"):
        replayed(llama, make_config("gkv"), tokens[:1], keep_sets=records)
    with pytest.raises(ValueError, match="keep_sets holds 1 layers, the model has 2"):
        replayed(llama, make_config("gkv"), tokens, keep_sets=records[:1])
    with pytest.raises(ValueError, match="layer 1 is dense in this config"):
        replayed(llama, make_config("gkv", dense_layers=[1]), tokens, keep_sets=records)


def test_keep_sets_apply_under_the_keyset_kernel(llama, tokens, monkeypatch):
    """The Triton keyset kernel (under the interpreter on CPU, see tests/conftest.py) attends the recorded sets."""
    config = make_config("gkv")
    decoded, records, _ = decode_with_records(llama, config, tokens)
    monkeypatch.setenv("KVTRAIN_KERNELS", "triton")
    logits, _ = replayed(llama, config, tokens, keep_sets=records)
    assert (decoded - logits).abs().max().item() <= 1e-4


QUANTISED = dict(quant=QuantConfig(key_bits=2, value_bits=2, group_size=16), selection="per_layer")


def test_the_quantised_archive_holds_the_recorded_codes(llama, tokens):
    """Replay archives the cache's own codes: with them it equals decode; with other codes of the same shape it does
    not (so the codes, not a re-quantisation of this forward's values, are what it attends). They cover every
    position up to the last event, and travel with rows through `KeepSetBatch` like the keep-sets."""
    config = make_config("gkv", **QUANTISED)
    decoded, records, codes = decode_with_records(llama, config, tokens)
    last_event = event_points(config.schedule, PREFILL, SEQ)[-1]
    assert all(sorted(layer) == ["keys", "values"] for layer in codes)
    assert all(t.shape[2] == last_event for layer in codes for side in layer.values() for t in side.values())
    logits, _ = replayed(llama, config, tokens, keep_sets=records, codes=codes)
    assert (decoded - logits).abs().max().item() <= 1e-4
    other = [{side: {**encoded, "codes": encoded["codes"] ^ 0x55} for side, encoded in layer.items()} for layer in codes]
    moved, _ = replayed(llama, config, tokens, keep_sets=records, codes=other)
    assert (decoded - moved)[:, PREFILL:].abs().max().item() > 1e-3
    row = KeepSetBatch.from_fields(KeepSetBatch.from_records(records, 2, codes).fields()).slice(1, 2)
    alone, _ = replayed(llama, config, tokens[1:], keep_sets=row.records(), codes=row.layer_codes())
    assert (decoded[1:] - alone).abs().max().item() <= 1e-4


def test_recorded_keep_sets_of_a_quantised_cache_need_its_codes(llama, tokens):
    config = make_config("gkv", **QUANTISED)
    _, records, codes = decode_with_records(llama, config, tokens)
    with pytest.raises(ValueError, match=r"layer 0: the config quantises \['keys', 'values'\] and codes were given "
                                         r"for nothing"):
        replayed(llama, config, tokens, keep_sets=records)
    with pytest.raises(ValueError, match="codes without keep_sets"):
        replayed(llama, config, tokens, codes=codes)
    short = [{side: {name: t[:, :, :PREFILL] for name, t in encoded.items()} for side, encoded in layer.items()}
             for layer in codes]
    with pytest.raises(ValueError, match=rf"layer 0: keys codes recorded for {PREFILL} positions, but an event at"):
        replayed(llama, config, tokens, keep_sets=records, codes=short)
