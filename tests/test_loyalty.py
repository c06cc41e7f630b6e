"""Loyalty metrics against explicit formulas, and the two measurement paths against each other."""

from __future__ import annotations

import math

import pytest
import torch

from kvtrain.config import KVCompressionConfig, ScheduleConfig, ScorerConfig
from kvtrain.eval.loyalty import continuation_metrics, evaluate_loyalty, full_cache_bytes_per_token
from kvtrain.models import tiny_model


def test_metrics_match_per_token_formulas():
    gen = torch.Generator().manual_seed(0)
    full, comp = torch.randn(5, 11, generator=gen), torch.randn(5, 11, generator=gen)
    targets = torch.randint(0, 11, (5,), generator=gen)
    metrics = continuation_metrics(full, comp, targets)
    for t in range(5):
        p = [math.exp(x) for x in full[t].tolist()]
        q = [math.exp(x) for x in comp[t].tolist()]
        p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
        assert metrics["kl"][t].item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-5)
        assert metrics["top1"][t].item() == float(max(range(11), key=p.__getitem__) == max(range(11), key=q.__getitem__))
        assert metrics["nll_compressed"][t].item() == pytest.approx(-math.log(q[targets[t]]), rel=1e-5)
        assert metrics["nll_full"][t].item() == pytest.approx(-math.log(p[targets[t]]), rel=1e-5)


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=61, seed=3)


def test_no_compression_is_perfectly_loyal_and_full_sized(model):
    blocks = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(1))
    (result,) = evaluate_loyalty(model, [KVCompressionConfig(budget=64)], blocks, context_len=24, progress=False)
    assert result.kl_full_to_compressed == pytest.approx(0.0, abs=1e-6)
    assert result.top1_agreement == 1.0
    assert result.nll_compressed == pytest.approx(result.nll_full, abs=1e-5)
    assert result.cache_bytes_per_token == full_cache_bytes_per_token(model) == 2 * 2 * 2 * 16 * 4


def test_replay_measurement_equals_the_cache(model):
    blocks = torch.randint(0, 61, (2, 48), generator=torch.Generator().manual_seed(2))
    config = KVCompressionConfig(budget=12, sinks=2, recent=4, scorer=ScorerConfig("gkv"), schedule=ScheduleConfig(interval=8))
    cache, replay = (
        evaluate_loyalty(model, [config], blocks, context_len=24, method=m, progress=False)[0] for m in ("cache", "replay")
    )
    assert cache.kl_full_to_compressed > 1e-4
    assert replay.kl_full_to_compressed == pytest.approx(cache.kl_full_to_compressed, rel=1e-3, abs=1e-6)
    assert replay.cache_bytes_per_token is None and cache.cache_fraction < 1


def test_reference_model_replaces_the_full_cache(model):
    blocks = torch.randint(0, 61, (1, 30), generator=torch.Generator().manual_seed(3))
    other = tiny_model("qwen2", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=61, seed=9)
    (result,) = evaluate_loyalty(
        model, [KVCompressionConfig(budget=64)], blocks, context_len=20, reference=lambda ids: other(input_ids=ids).logits, progress=False
    )
    assert result.kl_full_to_compressed > 1e-3  # loyal to itself, not to another model
