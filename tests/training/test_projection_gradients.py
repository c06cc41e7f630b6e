"""Gradients w.r.t. trainable low-rank projections under replay equal independent references: autograd
through a hand-written attention with ``k^ = B A^T k``, and central finite differences of a whole model."""

from __future__ import annotations

import types

import pytest
import torch

from kvtrain.artifacts.projections import Projections, write_projections
from kvtrain.config import KVCompressionConfig
from kvtrain.lowrank import LowRankPair
from kvtrain.models import model_fingerprint, tiny_model
from kvtrain.runtime.compressor import build_compressors
from kvtrain.runtime.replay import Replay, replay_compression
from kvtrain.training.projections import TrainableProjections

H_Q, H_KV, D, RANK = 4, 2, 8, 3
SEQ, PREFILL = 14, 8


def _random_pair(generator: torch.Generator, dtype=torch.float64) -> LowRankPair:
    shape = (H_KV, D, RANK)
    return LowRankPair(
        torch.randn(shape, generator=generator, dtype=dtype) / D**0.5,
        torch.randn(shape, generator=generator, dtype=dtype) / D**0.5,
        torch.ones(H_KV, D, dtype=torch.float64),
    )


def _hand_written_attention(q, k, v, key_pair, value_pair, prefill, scaling):
    """Replay of a cache that archives the prefill through the low-rank codecs and never evicts: a decode
    query (position >= prefill) sees prefill keys as B A^T k and values as B_v A_v^T v, every other key
    and value as is; a prefill query sees raw keys (the prefill forward runs before the first event)."""
    group = q.shape[1] // k.shape[1]
    k_hat = torch.einsum("bhnd,hdr,her->bhne", k, key_pair.a, key_pair.b)
    v_hat = torch.einsum("bhnd,hdr,her->bhne", v, value_pair.a, value_pair.b)
    k, v, k_hat, v_hat = (x.repeat_interleave(group, dim=1) for x in (k, v, k_hat, v_hat))
    n = q.shape[2]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    archived = (i >= prefill) & (j < prefill)
    logits = torch.where(archived, q @ k_hat.transpose(-1, -2), q @ k.transpose(-1, -2)) * scaling
    weights = logits.masked_fill(j > i, float("-inf")).softmax(dim=-1)
    return (weights * ~archived) @ v + (weights * archived) @ v_hat


def test_replay_gradient_equals_hand_written_attention():
    g = torch.Generator().manual_seed(0)
    model = tiny_model("llama", num_layers=1, hidden_size=32, num_heads=H_Q, num_kv_heads=H_KV)
    # The projections file is never read: the supplied pairs replace it.
    config = KVCompressionConfig.from_dict({
        "budget": None, "compression_ratio": 0.0, "sinks": 0, "recent": 0,
        "lowrank": {"projections": "/nonexistent/projections.safetensors"}, "schedule": {"interval": 1000},
    })
    key_pair, value_pair = _random_pair(g), _random_pair(g)
    leaves = [t.requires_grad_() for t in (key_pair.a, key_pair.b, value_pair.a, value_pair.b)]
    q = torch.randn(1, H_Q, SEQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, H_KV, SEQ, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, H_KV, SEQ, D, generator=g, dtype=torch.float64)
    weights = torch.randn(1, H_Q, SEQ, D, generator=g, dtype=torch.float64)
    scaling = D**-0.5

    compressors = build_compressors(config, model, projections=([key_pair], [value_pair]))
    replay = Replay(compressors, config.schedule, PREFILL, record=False)
    out = replay.attend(0, q, k, v, None, scaling)
    grads = torch.autograd.grad((out * weights).sum(), leaves)

    expected_out = _hand_written_attention(q, k, v, key_pair, value_pair, PREFILL, scaling)
    expected = torch.autograd.grad((expected_out * weights).sum(), leaves)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("A", "B", "A_v", "B_v"), grads, expected):
        assert want.abs().max() > 1e-3, name  # the reference gradient is not trivially zero
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


def _rms_norm_in_input_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon)


@pytest.fixture(scope="module")
def model_and_projections(tmp_path_factory):
    """A float64 tiny model under eviction + low-rank keys and values, with trainable projections."""
    model = tiny_model("llama", num_layers=2, hidden_size=32, num_heads=H_Q, num_kv_heads=H_KV, vocab_size=50).double()
    # Llama's RMSNorm rounds activations to float32, which would drown a finite difference in noise.
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)
    g = torch.Generator().manual_seed(1)
    pairs = [[_random_pair(g, torch.float32) for _ in range(2)] for _ in range(2)]
    path = tmp_path_factory.mktemp("proj") / "projections.safetensors"
    write_projections(path, Projections("kqsvd", pairs[0], pairs[1]), model_fingerprint(model.config))
    config = KVCompressionConfig.from_dict({
        "budget": 6, "sinks": 1, "recent": 2, "query_window": 2, "lowrank": {"projections": str(path)},
        "schedule": {"interval": 3},
    })
    projections = TrainableProjections.from_config(config, model.config).double()
    return model, config, projections


def test_model_gradient_equals_central_differences(model_and_projections):
    model, config, projections = model_and_projections
    ids = torch.randint(0, 50, (2, SEQ), generator=torch.Generator().manual_seed(2))
    weights = torch.randn(2, SEQ, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss() -> torch.Tensor:
        with replay_compression(model, config, prefill_len=PREFILL, projections=projections.layer_pairs()):
            return (model(input_ids=ids, use_cache=False).logits * weights).sum()

    params = dict(projections.named_parameters())
    assert sorted(params) == [f"pairs.{side}_{layer}_{part}" for side in ("key", "value") for layer in (0, 1) for part in "ab"]
    grads = dict(zip(params, torch.autograd.grad(loss(), list(params.values()))))
    pick = torch.Generator().manual_seed(4)
    eps = 1e-6
    for name, param in params.items():
        assert grads[name].abs().max() > 1e-4, name
        for flat in torch.randint(0, param.numel(), (3,), generator=pick).tolist():
            index = torch.unravel_index(torch.tensor(flat), param.shape)
            with torch.no_grad():
                original = param[index].item()
                param[index] = original + eps
                up = loss().item()
                param[index] = original - eps
                down = loss().item()
                param[index] = original
            assert grads[name][index].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8), (name, index)


def test_balanced_factors_keep_the_map_and_equalise_column_norms():
    from kvtrain.training.projections import balanced

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 8, 4, generator=g, dtype=torch.float64) * 1e-4  # calibrated scales: tiny a, large b
    b = torch.randn(3, 8, 4, generator=g, dtype=torch.float64) * 20.0
    a2, b2 = balanced(a, b)
    torch.testing.assert_close(b2 @ a2.mT, b @ a.mT, rtol=1e-12, atol=0)
    torch.testing.assert_close(a2.norm(dim=1), b2.norm(dim=1), rtol=1e-12, atol=0)
