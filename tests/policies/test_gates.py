"""Learned retention gates: the cache's threshold and budget modes, the training relaxation's hard forward against
the cache's decode, and its mask against a plain loop over queries and keys."""

from __future__ import annotations

import pytest
import torch

from kvtrain.config import KVCompressionConfig, MergeConfig, QuantConfig, ScheduleConfig, ScorerConfig
from kvtrain.models import tiny_model
from kvtrain.models.rope import apply_rope, rope_cos_sin
from kvtrain.policies import ScoreInputs
from kvtrain.policies.gates import GATES_ATTRIBUTE, GateScorer, RetentionGates, attached_gates
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.decode import teacher_forced_decode
from kvtrain.runtime.replay import replay_compression
from kvtrain.training.gates import compression_loss, gate_log_mask, gate_relaxation

SEQ, PREFILL, WINDOW, SINKS, RECENT, INTERVAL = 70, 40, 6, 2, 4, 8


def gated_model(scale: float):
    model = tiny_model("llama", num_layers=2, hidden_size=96, num_heads=6, num_kv_heads=2, vocab_size=97, seed=0)
    gates = attached_gates(model)
    with torch.no_grad():
        gates.weight.normal_(0.0, scale, generator=torch.Generator().manual_seed(3))
        gates.bias.fill_(-0.2 if scale else 0.0)
    return model


def threshold_config(**overrides) -> KVCompressionConfig:
    fields = dict(
        budget=1000,  # no cap: the relaxation does not model one
        sinks=SINKS,
        recent=RECENT,
        scorer=ScorerConfig("gate", {"mode": "threshold", "window": WINDOW}),
        query_window=8,
        schedule=ScheduleConfig(interval=INTERVAL),
    )
    fields.update(overrides)
    return KVCompressionConfig(**fields)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (1, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model():
    return gated_model(scale=0.5)


def decode(model, config, tokens):
    cache = CompressedCache.for_model(model, config, record=True)
    with torch.no_grad():
        logits = teacher_forced_decode(model, cache, tokens, prefill_len=PREFILL)
    return cache, logits


def reference_visible(keep_logits: torch.Tensor, seq: int) -> torch.Tensor:
    """[h, S, S] bool from the policy's wording, one query and key at a time: key j leaves the cache at the first
    event (after the prefill, then every INTERVAL decode steps) at which it is at least WINDOW tokens old, not a
    sink, not among the RECENT last tokens, and its keep logit is negative; query i sees the causal keys that no
    event at or before i removed."""
    events = [PREFILL] + list(range(PREFILL + INTERVAL, seq, INTERVAL))
    h = keep_logits.shape[0]
    visible = torch.zeros(h, seq, seq, dtype=torch.bool)
    for head in range(h):
        for i in range(seq):
            for j in range(i + 1):
                gone = False
                for e in events:
                    if e > i or j >= e:
                        continue
                    old = e - 1 - j >= WINDOW
                    protected = j < SINKS or j >= e - RECENT
                    if old and not protected and float(keep_logits[head, j]) < 0:
                        gone = True
                visible[head, i, j] = not gone
    return visible


def test_relaxation_mask_matches_a_loop_over_queries_and_keys():
    keep_logits = torch.randn(1, 2, SEQ, generator=torch.Generator().manual_seed(5))
    policy = threshold_config().layer_policy(0, 2)
    bias = gate_log_mask(keep_logits, torch.ones(1, SEQ, dtype=torch.bool), policy, PREFILL, window=WINDOW)
    expected = reference_visible(keep_logits[0], SEQ)
    assert torch.equal(bias[0] == 0, expected)
    assert torch.equal(torch.isinf(bias[0]), ~expected)
    assert (~expected).any()


def test_hard_relaxation_equals_the_cache_decode_with_decode_time_evictions(model, tokens):
    config = threshold_config()
    cache, decoded = decode(model, config, tokens)
    with torch.no_grad(), gate_relaxation(model, config, prefill_len=PREFILL):
        relaxed = model(input_ids=tokens, use_cache=False).logits
    assert (decoded - relaxed).abs().max().item() <= 1e-4
    # Evictions happened at the prefill event and at decode events, and the cache really changed the logits.
    for layer in cache.records:
        assert layer[0].tokens_seen == PREFILL and (layer[0].kept[0] >= 0).sum(dim=-1).max() < PREFILL
        assert any(r.tokens_seen > PREFILL for r in layer)
    with torch.no_grad():
        full = model(input_ids=tokens, use_cache=False).logits
    assert (decoded[:, PREFILL:] - full[:, PREFILL:]).abs().max() > 1e-3


def gate_logits(model, tokens) -> dict[int, torch.Tensor]:
    """Per layer, the keep logits [b, h_kv, S] of the teacher-forced forward (the relaxation computes them)."""
    with torch.no_grad(), gate_relaxation(model, threshold_config(), prefill_len=PREFILL) as route:
        logits_by_layer = {}
        original = route.keep_logits

        def spy(layer, key, value, position_ids):
            logits_by_layer[layer] = original(layer, key, value, position_ids)
            return logits_by_layer[layer]

        route.keep_logits = spy
        model(input_ids=tokens, use_cache=False)
    return logits_by_layer


def test_cache_keep_sets_match_the_loop_reference(model, tokens):
    cache, _ = decode(model, threshold_config(), tokens)
    logits_by_layer = gate_logits(model, tokens)
    for layer, records in enumerate(cache.records):
        visible = reference_visible(logits_by_layer[layer][0], SEQ)
        for record in records:
            e = record.tokens_seen
            for head in range(2):
                kept = sorted(p for p in record.kept[0, head].tolist() if p >= 0)
                assert kept == [j for j in range(e) if visible[head, e, j]]


def test_untrained_threshold_gate_is_the_full_cache(tokens):
    untrained = gated_model(scale=0.0)
    _, decoded = decode(untrained, threshold_config(), tokens)
    with torch.no_grad():
        full = untrained(input_ids=tokens, use_cache=False).logits
        with gate_relaxation(untrained, threshold_config(), prefill_len=PREFILL):
            relaxed = untrained(input_ids=tokens, use_cache=False).logits
    assert (decoded - full).abs().max().item() <= 1e-4
    assert (relaxed - full).abs().max().item() <= 1e-4


def test_scorer_logit_is_the_gate_of_the_unrotated_key_and_is_kept_once_written():
    """Closed form: w . [k_pre; v] + bias for new tokens, where the stored key is k_pre rotated at its RoPE position
    (left padding shifts it); tokens with history keep the logit they were written with, whatever their (archived,
    possibly quantised) key and value read now."""
    gen = torch.Generator().manual_seed(7)
    b, h, n, d = 2, 2, 6, 8
    gates = RetentionGates(num_layers=1, num_kv_heads=h, head_dim=d)
    with torch.no_grad():
        gates.weight.normal_(generator=gen)
        gates.bias.normal_(generator=gen)
    pre, values = torch.randn(b, h, n, d, generator=gen), torch.randn(b, h, n, d, generator=gen)
    positions = torch.arange(3, 3 + n).expand(b, h, n)
    rope_offset = torch.tensor([0, 2])
    cos, sin = rope_cos_sin(positions[:, 0] - rope_offset[:, None], d)
    keys = apply_rope(pre, cos, sin)
    history = torch.zeros(b, h, n, dtype=torch.bool)
    history[:, :, :2] = True
    written = torch.randn(b, h, n, generator=gen)
    inputs = ScoreInputs(keys=keys, values=values, positions=positions, valid=torch.ones(b, h, n, dtype=torch.bool),
                         has_history=history, queries=torch.zeros(b, h, 1, d), query_positions=torch.tensor([8]),
                         rope_offset=rope_offset, scaling=d**-0.5, layer_idx=0, last_event_position=4)
    scorer = GateScorer()
    scorer.gates = gates
    scores, state = scorer(inputs, {"logit": written})
    expected = torch.einsum("bhnf,hf->bhn", torch.cat([pre, values], -1), gates.weight[0]) + gates.bias[0][:, None]
    expected = torch.where(history, written, expected)
    torch.testing.assert_close(scores, expected.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(state["logit"], scores)


def test_budget_cap_bounds_the_threshold_cache(model, tokens):
    cache, _ = decode(model, threshold_config(budget=24), tokens)
    for layer in cache.records:
        assert all((r.kept[0] >= 0).sum(dim=-1).max() <= 24 for r in layer)


@pytest.mark.parametrize("overrides", [
    {},
    {"selection": "head_adaptive"},
    {"merge": MergeConfig(threshold=0.0)},
]
)
def test_budget_mode_replay_and_recorded_keep_sets_equal_the_decode(model, tokens, overrides):
    config = KVCompressionConfig(budget=20, sinks=SINKS, recent=RECENT, scorer=ScorerConfig("gate"), query_window=8,
                                 schedule=ScheduleConfig(interval=INTERVAL), **overrides)
    cache, decoded = decode(model, config, tokens)
    with torch.no_grad(), replay_compression(model, config, prefill_len=PREFILL) as _:
        replayed = model(input_ids=tokens, use_cache=False).logits
    with torch.no_grad(), replay_compression(model, config, prefill_len=PREFILL, keep_sets=cache.records):
        recorded = model(input_ids=tokens, use_cache=False).logits
    assert (decoded - replayed).abs().max().item() <= 1e-4
    assert (decoded - recorded).abs().max().item() <= 1e-4
    assert all(len(layer) >= 2 for layer in cache.records)
    if not overrides:  # per head, the prefill event keeps sinks, recent tokens and the best keep logits
        for layer, logits in gate_logits(model, tokens).items():
            for head in range(2):
                ranked = sorted(range(SINKS, PREFILL - RECENT), key=lambda j: -float(logits[0, head, j]))
                expected = set(range(SINKS)) | set(range(PREFILL - RECENT, PREFILL)) | set(ranked[: 20 - SINKS - RECENT])
                assert set(cache.records[layer][0].kept[0, head].tolist()) == expected


def test_budget_mode_with_tada_replays_its_recorded_keep_sets(model, tokens):
    """With TaDA, re-selecting in replay may flip a near-tie of the gates' logits (a decode step and the batched
    forward round values differently by ~1e-7); the recorded keep-sets, which GRPO trains on, replay exactly."""
    config = KVCompressionConfig(budget=20, sinks=SINKS, recent=RECENT, scorer=ScorerConfig("gate"), query_window=8,
                                 schedule=ScheduleConfig(interval=INTERVAL), selection="per_layer",
                                 quant=QuantConfig(key_bits=None, value_bits=4, group_size=16))
    cache, decoded = decode(model, config, tokens)
    with torch.no_grad(), replay_compression(model, config, prefill_len=PREFILL, keep_sets=cache.records,
                                             codes=cache.codes):
        recorded = model(input_ids=tokens, use_cache=False).logits
    assert (decoded - recorded).abs().max().item() <= 1e-4


def test_threshold_records_replay_exactly(model, tokens):
    """GRPO trains on the sampling cache's records: a threshold cache's records replay to its logits."""
    config = threshold_config()
    cache, decoded = decode(model, config, tokens)
    with torch.no_grad(), replay_compression(model, config, prefill_len=PREFILL, keep_sets=cache.records):
        recorded = model(input_ids=tokens, use_cache=False).logits
    assert (decoded - recorded).abs().max().item() <= 1e-4


def test_noisy_relaxation_trains_the_gates(model, tokens):
    """The KL reaches the gates through the straight-through mask alone; the compression term pushes keep logits
    down while fewer tokens are evicted than the target (and not at all above it: one-sided)."""
    config = threshold_config()
    gates = getattr(model, GATES_ATTRIBUTE)
    with torch.no_grad():
        teacher = torch.log_softmax(model(input_ids=tokens, use_cache=False).logits, dim=-1)
    torch.manual_seed(0)
    gates.zero_grad()
    with gate_relaxation(model, config, prefill_len=PREFILL, noisy=True) as route:
        student = torch.log_softmax(model(input_ids=tokens, use_cache=False).logits, dim=-1)
        torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean").backward()
        evicted = route.evict_fraction().detach()
    assert torch.isfinite(gates.weight.grad).all() and gates.weight.grad.abs().sum() > 0
    for target, sign in ((float(evicted) + 0.1, 1.0), (float(evicted) - 0.1, 0.0)):
        gates.zero_grad()
        with gate_relaxation(model, config, prefill_len=PREFILL) as route:
            model(input_ids=tokens, use_cache=False)
            compression_loss(route.evict_fraction(), target).backward()
        assert torch.all(torch.sign(gates.bias.grad) == sign)


def test_gate_weights_load_from_a_file(model, tokens, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "gates.safetensors"
    save_file({k: v.detach().contiguous() for k, v in getattr(model, GATES_ATTRIBUTE).state_dict().items()}, path)
    fresh = tiny_model("llama", num_layers=2, hidden_size=96, num_heads=6, num_kv_heads=2, vocab_size=97, seed=0)
    config = threshold_config(scorer=ScorerConfig("gate", {"mode": "threshold", "window": WINDOW, "weights": str(path)}))
    _, expected = decode(model, threshold_config(), tokens)
    _, loaded = decode(fresh, config, tokens)
    assert torch.equal(expected, loaded)
    other = tiny_model("llama", num_layers=3, hidden_size=96, num_heads=6, num_kv_heads=2, vocab_size=97, seed=0)
    with pytest.raises(ValueError, match="weight is \\(2, 2, 32\\), this model needs \\(3, 2, 32\\)"):
        CompressedCache.for_model(other, config)
