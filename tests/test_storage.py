"""Low-rank and quantised storage in the cache and in replay: parity, bytes held, exactness, errors."""

from __future__ import annotations

import pytest
import torch

from kvtrain.artifacts.projections import Projections, write_projections
from kvtrain.artifacts.quant_plan import Budget, QuantPlan, write_quant_plan
from kvtrain.config import (
    ConfigError,
    KVCompressionConfig,
    LowRankConfig,
    MergeConfig,
    QuantConfig,
    ScheduleConfig,
    ScorerConfig,
)
from kvtrain.lowrank.gram import GramAccumulator, ValueGramAccumulator
from kvtrain.lowrank.kqsvd import fit_kqsvd, fit_value_projection
from kvtrain.models import model_fingerprint, tiny_model
from kvtrain.quant.tada import bytes_per_token, fake_quantize
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.compressor import projections_for
from kvtrain.runtime.decode import teacher_forced_decode
from kvtrain.runtime.replay import replay_compression
from kvtrain.runtime.routing import observe_attention

SEQ, PREFILL, VOCAB = 60, 36, 97
HEAD_DIM, KV_HEADS = 16, 2


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=KV_HEADS, vocab_size=VOCAB, seed=4)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def projections(model, tmp_path_factory):
    """KQ-SVD fitted at full rank on the model's own activations, written as a projections file."""
    layers = model.config.num_hidden_layers
    grams = [GramAccumulator(KV_HEADS, HEAD_DIM, 2, layer_idx=i) for i in range(layers)]
    value_grams = [ValueGramAccumulator(KV_HEADS, HEAD_DIM, layer_idx=i) for i in range(layers)]

    def collect(module, query, key, value, mask):
        grams[module.layer_idx].update(key, query)
        value_grams[module.layer_idx].update(value)

    calibration = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), observe_attention(model, collect):
        model(input_ids=calibration)
    attn = [layer.self_attn for layer in model.model.layers]
    projections = Projections(
        "kqsvd",
        [fit_kqsvd(g, HEAD_DIM) for g in grams],
        [fit_value_projection(v, a.o_proj.weight.detach(), HEAD_DIM) for v, a in zip(value_grams, attn)],
    )
    path = tmp_path_factory.mktemp("proj") / "projections.safetensors"
    write_projections(path, projections, model_fingerprint(model.config))
    return path


def run_both(model, config, tokens):
    cache = CompressedCache.for_model(model, config, record=True)
    decoded = teacher_forced_decode(model, cache, tokens, prefill_len=PREFILL)
    with torch.no_grad(), replay_compression(model, config, prefill_len=PREFILL):
        replayed = model(input_ids=tokens, use_cache=False).logits
    return cache, decoded, replayed


def config(**fields) -> KVCompressionConfig:
    base = dict(budget=24, sinks=2, recent=4, scorer=ScorerConfig("gkv"), selection="per_layer", query_window=8,
                schedule=ScheduleConfig(interval=8))
    base.update(fields)
    return KVCompressionConfig(**base)


CASES = {
    "tada-only": lambda p: config(budget=None, compression_ratio=0.0, quant=QuantConfig(key_bits=4, value_bits=2, group_size=8)),
    "gkv+tada": lambda p: config(quant=QuantConfig(key_bits=8, value_bits=4, group_size=8)),
    "gkv+lowrank-keys+tada-values": lambda p: config(
        lowrank=LowRankConfig(str(p), values=False, key_rank=6), quant=QuantConfig(key_bits=None, value_bits=4, group_size=8)
    ),
    "snapkv-per-head+lowrank": lambda p: config(scorer=ScorerConfig("snapkv"), selection="per_head", lowrank=LowRankConfig(str(p), key_rank=8, value_rank=8)),
    "lowrank+tada-chained": lambda p: config(lowrank=LowRankConfig(str(p), key_rank=8, value_rank=8), quant=QuantConfig(key_bits=4, value_bits=4, group_size=8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_replay_equals_decode_with_codecs(model, tokens, projections, case):
    cache, decoded, replayed = run_both(model, CASES[case](projections), tokens)
    assert (decoded - replayed).abs().max().item() <= 1e-4
    with torch.no_grad():
        full = model(input_ids=tokens).logits
    assert (decoded - full).abs().max() > 1e-3  # the codecs really changed something


def test_quantised_bytes_held_equal_the_formula(model, tokens):
    cfg = config(budget=None, compression_ratio=0.0, quant=QuantConfig(key_bits=4, value_bits=2, group_size=8))
    cache = CompressedCache.for_model(model, cfg)
    with torch.no_grad():
        model(input_ids=tokens[:, :PREFILL], past_key_values=cache)  # prefill: every token archived
    per_token = bytes_per_token(KV_HEADS, HEAD_DIM, 4, 2, 8)
    assert cache.nbytes() == model.config.num_hidden_layers * PREFILL * per_token


def plan_file(tmp_path, bits, group_size=8, residual_length=8):
    path = tmp_path / "quant_plan.json"
    write_quant_plan(path, QuantPlan(bits, group_size, residual_length, Budget("average_bits", 8.0)))
    return str(path)


def test_a_calibrated_plan_sets_each_layers_bits(model, tokens, tmp_path):
    cfg = config(budget=None, compression_ratio=0.0, quant=QuantConfig(group_size=8, plan=plan_file(tmp_path, [2, 8])))
    cache = CompressedCache.for_model(model, cfg)
    with torch.no_grad():
        model(input_ids=tokens[:, :PREFILL], past_key_values=cache)
    per_token = [bytes_per_token(KV_HEADS, HEAD_DIM, bits, bits, 8) for bits in (2, 8)]
    assert cache.nbytes() == PREFILL * sum(per_token)


@pytest.mark.parametrize(("plan", "quant", "match"), [
    (dict(group_size=16), dict(group_size=8),
     r"quant_plan.json: group_size=16 but quant.group_size=8: .* set quant.group_size: 16"),
    (dict(residual_length=128), dict(group_size=8),
     r"quant_plan.json: residual_length=128 but schedule.interval=8: .* --tada-residual-length 8"),
    (dict(bits=[4, 4, 4]), dict(group_size=8), r"quant_plan.json: 3 layers in the plan, the model has 2"),
])
def test_a_plan_that_disagrees_with_the_config_is_refused(model, tmp_path, plan, quant, match):
    path = plan_file(tmp_path, **{"bits": [4, 4], **plan})
    cfg = config(budget=None, compression_ratio=0.0, quant=QuantConfig(plan=path, **quant))
    with pytest.raises(ConfigError, match=match):
        CompressedCache.for_model(model, cfg)
    with pytest.raises(ConfigError, match=match), replay_compression(model, cfg, prefill_len=PREFILL):
        pass


def test_lowrank_bytes_are_the_coefficients(model, tokens, projections):
    cfg = config(budget=None, compression_ratio=0.0, lowrank=LowRankConfig(str(projections), key_rank=5, value_rank=3))
    cache = CompressedCache.for_model(model, cfg)
    with torch.no_grad():
        model(input_ids=tokens[:, :PREFILL], past_key_values=cache)
    assert cache.nbytes() == model.config.num_hidden_layers * PREFILL * KV_HEADS * (5 + 3) * 4


def test_full_rank_projections_are_exact(model, tokens, projections):
    cfg = config(budget=None, compression_ratio=0.0, lowrank=LowRankConfig(str(projections)))
    cache = CompressedCache.for_model(model, cfg)
    decoded = teacher_forced_decode(model, cache, tokens, prefill_len=PREFILL)
    with torch.no_grad():
        full = model(input_ids=tokens).logits
    assert (decoded - full).abs().max().item() <= 1e-3


def straight_through_reference(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Dense attention in which query i sees the keys and values archived before its forward (columns below the
    last event at or before i) as their TaDA round trip with the identity gradient, and every later one exact."""
    archived_before = torch.zeros(SEQ, dtype=torch.long)
    for event in range(PREFILL, SEQ, 8):  # the prefill event, then one every interval (8) decode steps
        archived_before[event:] = event
    archived = torch.arange(SEQ)[None, :] < archived_before[:, None]  # [query i, key j]

    def sides(x):
        rounded = fake_quantize(x.detach(), 2, 8)  # the values only; the gradient is written out below
        return x + (rounded - x).detach(), x

    group = query.shape[1] // key.shape[1]
    (k_st, k), (v_st, v) = [tuple(t.repeat_interleave(group, dim=1) for t in sides(x)) for x in (key, value)]
    logits = torch.where(archived, query @ k_st.transpose(-1, -2), query @ k.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~torch.ones(SEQ, SEQ, dtype=torch.bool).tril(), float("-inf"))
    probs = logits.softmax(dim=-1)
    out = (probs * archived) @ v_st + (probs * ~archived) @ v
    return out.transpose(1, 2), None


def test_replay_gradients_pass_quantisation_straight_through(model, tokens):
    """The gradient through the quantised archive equals that of the straight-through estimator written out
    densely (no compression: every kept token is quantised once an event archives it)."""
    from transformers import AttentionInterface

    cfg = config(budget=None, compression_ratio=0.0, quant=QuantConfig(key_bits=2, value_bits=2, group_size=8))
    weights = [p for layer in model.model.layers for p in (layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight)]

    def loss():
        return model(input_ids=tokens, use_cache=False).logits[:, PREFILL:].logsumexp(-1).mean()

    with replay_compression(model, cfg, prefill_len=PREFILL):
        got = torch.autograd.grad(loss(), weights)
    AttentionInterface.register("straight_through_reference", straight_through_reference)
    model.set_attn_implementation("straight_through_reference")
    try:
        want = torch.autograd.grad(loss(), weights)
    finally:
        model.set_attn_implementation("kvtrain")
    for g, w in zip(got, want):
        assert w.abs().max() > 1e-4  # the reference gradient is not trivially zero
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_projections_from_another_model_are_refused(projections):
    other = tiny_model("llama", num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        projections_for(LowRankConfig(str(projections)), other.config)


def test_corrupt_projections_name_the_file(tmp_path, model):
    path = tmp_path / "projections.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="projections.safetensors"):
        projections_for(LowRankConfig(str(path)), model.config)


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"selection": "per_head", "quant": QuantConfig()}, "selection"),
        ({"merge": MergeConfig(), "quant": QuantConfig()}, "merge"),
        ({"quant": QuantConfig(key_bits=3)}, "quant.key_bits"),
        ({"lowrank": LowRankConfig()}, "lowrank.projections"),
    ],
)
def test_impossible_combinations_are_refused(fields, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config(**fields)


@pytest.mark.parametrize("straight_through", [False, True])
def test_take_decodes_only_the_asked_tokens_as_the_full_view_would(straight_through):
    from kvtrain.artifacts.projections import LowRankPair
    from kvtrain.runtime.codecs import ChainCodec, LowRankCodec, TadaCodec
    from kvtrain.runtime.storage import TokenStore

    g = torch.Generator().manual_seed(0)
    pair = LowRankPair(torch.randn(2, 8, 4, generator=g), torch.randn(2, 8, 4, generator=g), torch.ones(2, 4))
    for codec in (TadaCodec(4, 8), LowRankCodec(pair), ChainCodec(LowRankCodec(pair), TadaCodec(2, 4))):
        store = TokenStore(torch.randn(1, 2, 0, 8, generator=g), codec, straight_through=straight_through)
        store = store.append(torch.randn(1, 2, 5, 8, generator=g)).flush().append(torch.randn(1, 2, 3, 8, generator=g))
        idx = torch.tensor([[0, 2, 4, 5, 7]]).expand(1, 2, 5)  # archived and recent tokens, the same in both heads
        for held in (store, store.flush()):  # archive + recent tokens, and an archive alone
            expected = torch.gather(held.view(), 2, idx[..., None].expand(1, 2, 5, 8))
            torch.testing.assert_close(held.take(idx), expected, rtol=0, atol=0)
