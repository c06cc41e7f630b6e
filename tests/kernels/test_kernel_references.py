"""The PyTorch references against independent formulations, and the device dispatch of the functional APIs."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_close  # noqa: I001  (must precede kvtrain.kernels)

from kvtrain.kernels import decode_attention, dequantize, keyset_attention, quantize
from kvtrain.kernels.reference import decode_attention_reference, keyset_attention_reference
from kvtrain.quant import packing

TOL = (1e-5, 1e-5)
NEG_INF = float("-inf")


def test_decode_reference_is_sdpa_with_an_additive_mask() -> None:
    gen = torch.Generator().manual_seed(0)
    b, h_kv, group, n, d = 2, 2, 3, 11, 8
    q = torch.randn(b, h_kv * group, d, generator=gen)
    k, v = torch.randn(b, h_kv, n, d, generator=gen), torch.randn(b, h_kv, n, d, generator=gen)
    bias = torch.randn(b, h_kv, n, generator=gen)
    bias[0, 1, 4:] = NEG_INF
    out, scores = decode_attention_reference(q, k, v, bias, 0.5, return_key_scores=True)
    mask = bias.repeat_interleave(group, dim=1)[:, :, None, :]
    expected = F.scaled_dot_product_attention(q[:, :, None], k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                              attn_mask=mask, scale=0.5)[:, :, 0]
    assert_close(out, expected, TOL, "out")
    for i in range(b):
        for h in range(h_kv):
            probs = [torch.softmax(q[i, h * group + g] @ k[i, h].T * 0.5 + bias[i, h], dim=0) for g in range(group)]
            assert_close(scores[i, h], sum(probs), TOL, "key scores")


def _dense_mask_attention(q, k, v, kept_k, kept_v, kept_bias, starts, scaling, key_padding):
    """Full attention over [every event's kept entries, all S keys] with a per-row mask built entry by entry."""
    b, h_q, seq_len, _ = q.shape
    n_events, _, h_kv, kept, _ = kept_k.shape
    group = h_q // h_kv
    cols = n_events * kept + seq_len
    mask = torch.full((b, h_kv, seq_len, cols), NEG_INF)
    for i in range(b):
        for h in range(h_kv):
            for row in range(seq_len):
                e = max(j for j, s in enumerate(starts) if s <= row)
                for slot in range(kept):
                    mask[i, h, row, e * kept + slot] = kept_bias[e, i, h, slot]
                for col in range(starts[e], row + 1):
                    if key_padding[i, col]:
                        mask[i, h, row, n_events * kept + col] = 0.0
    keys = torch.cat([kept_k.permute(1, 2, 0, 3, 4).reshape(b, h_kv, n_events * kept, -1), k], dim=2)
    values = torch.cat([kept_v.permute(1, 2, 0, 3, 4).reshape(b, h_kv, n_events * kept, -1), v], dim=2)
    logits = q @ keys.repeat_interleave(group, 1).transpose(-1, -2) * scaling + mask.repeat_interleave(group, 1)
    alive = logits.amax(dim=-1, keepdim=True) > NEG_INF
    probs = torch.softmax(torch.where(alive, logits, 0.0), dim=-1) * alive
    return probs @ values.repeat_interleave(group, 1)


def test_keyset_reference_matches_dense_mask_formulation() -> None:
    gen = torch.Generator().manual_seed(1)
    b, h_kv, group, seq_len, d, kept = 2, 1, 2, 13, 4, 3
    starts = [0, 5, 6, 10]
    tensors = [torch.randn(*shape, generator=gen).requires_grad_() for shape in (
        (b, h_kv * group, seq_len, d), (b, h_kv, seq_len, d), (b, h_kv, seq_len, d),
        (len(starts), b, h_kv, kept, d), (len(starts), b, h_kv, kept, d))]
    bias = torch.rand(len(starts), b, h_kv, kept, generator=gen).log()
    bias[0] = NEG_INF
    bias[2, 1, 0, 1] = NEG_INF
    key_padding = torch.ones(b, seq_len, dtype=torch.bool)
    key_padding[1, :3] = False
    ref = keyset_attention_reference(*tensors, bias, starts, 0.4, key_padding)
    dense = _dense_mask_attention(*tensors, bias, starts, 0.4, key_padding)
    assert_close(ref, dense, TOL, "out")
    assert torch.all(ref[1, :, :3] == 0)
    grad = torch.randn(ref.shape, generator=gen)
    for a, e in zip(torch.autograd.grad(ref, tensors, grad), torch.autograd.grad(dense, tensors, grad)):
        assert_close(a, e, TOL, "grad")


def _raise(*args, **kwargs):
    raise AssertionError("the Triton path ran")


def test_cpu_tensors_dispatch_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    decode_mod = importlib.import_module("kvtrain.kernels.decode_attention")
    keyset_mod = importlib.import_module("kvtrain.kernels.keyset_attention")
    quant_mod = importlib.import_module("kvtrain.kernels.quant_pack")
    monkeypatch.setattr(decode_mod, "_decode_triton", _raise)
    monkeypatch.setattr(keyset_mod.KeysetAttentionFunction, "apply", _raise)
    monkeypatch.setattr(quant_mod, "_quantize_kernel", None)
    monkeypatch.setattr(quant_mod, "_dequantize_kernel", None)
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 16, generator=gen), torch.randn(1, 1, 9, 16, generator=gen)
    assert torch.equal(decode_attention(q, k, k, scaling=0.3), decode_attention_reference(q, k, k, None, 0.3))
    with pytest.raises(AssertionError, match="Triton path"):
        decode_attention(q, k, k, scaling=0.3, force="triton")

    qs, ks = torch.randn(1, 2, 9, 16, generator=gen), torch.randn(1, 1, 9, 16, generator=gen)
    kept, bias = torch.randn(2, 1, 1, 3, 16, generator=gen), torch.zeros(2, 1, 1, 3)
    args = (qs, ks, ks, kept, kept, bias, [0, 4], 0.3)
    assert torch.equal(keyset_attention(*args), keyset_attention_reference(*args))
    with pytest.raises(AssertionError, match="Triton path"):
        keyset_attention(*args, force="triton")

    x = torch.randn(3, 16, generator=gen)
    p = quantize(x, 4, 8)
    assert torch.equal(p.codes, packing.quantize(x, 4, 8).codes)
    assert torch.equal(dequantize(p), packing.dequantize(p))


def test_unknown_provider_is_rejected() -> None:
    q, k = torch.randn(1, 2, 16), torch.randn(1, 1, 9, 16)
    with pytest.raises(ValueError, match="force='cuda'"):
        decode_attention(q, k, k, scaling=0.3, force="cuda")
