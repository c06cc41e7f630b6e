"""TaDA mean-centred quantisation: reconstruction bound, the invariances that do (and do not) hold, byte
accounting against the held tensors, the residual-buffer policy against a token-by-token simulation, and the
straight-through estimator."""

from __future__ import annotations

import pytest
import torch

from kvtrain.quant.packing import dequantize, quantize
from kvtrain.quant.tada import (
    bytes_per_token,
    fake_quantize,
    residual_flush,
    tada_dequantize,
    tada_quantize,
)

B, H, N, D = 2, 4, 6, 16


def _x(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, N, D, generator=gen)
    x[..., 3] += 20.0  # a channel outlier shared by all heads: what the mean absorbs
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_reconstruction_within_half_a_step_of_the_deviation_range(bits: int):
    x = _x()
    gs = 8
    t = tada_quantize(x, bits, gs)
    mean_ref = sum(x[:, h] for h in range(H)) / H  # explicit loop over heads
    torch.testing.assert_close(t.mean[:, 0].float(), mean_ref.half().float())
    dev = x - t.mean.float()
    groups = dev.reshape(B, H, N, D // gs, gs)
    step = (groups.amax(-1) - groups.amin(-1)) / (2**bits - 1)
    err = (tada_dequantize(t) - x).abs().reshape(B, H, N, D // gs, gs).amax(-1)
    # Half a step, plus float16 rounding of the stored scale/zero.
    assert (err <= 0.5 * step * (1 + 2e-3) + 2e-3 * groups.abs().amax(-1) + 1e-6).all()


def test_mean_centring_removes_a_shared_outlier_from_the_quantiser():
    x = _x(1)
    plain = dequantize(quantize(x, 4, 16)) - x
    centred = tada_dequantize(tada_quantize(x, 4, 16)) - x
    assert centred.pow(2).mean() < 0.1 * plain.pow(2).mean()


def _grid(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Values on a 1/8 grid: with H = 4 heads the mean stays exact in float16, so invariances are exact."""
    return torch.randint(-80, 80, shape, generator=gen).float() / 8


def test_codes_are_invariant_to_a_per_token_vector_shared_by_all_heads():
    gen = torch.Generator().manual_seed(2)
    x = _grid(gen, (B, H, N, D))
    c = _grid(gen, (B, 1, N, D))  # differs per token
    a, b = tada_quantize(x, 2, 8), tada_quantize(x + c, 2, 8)
    assert torch.equal(a.deviation.codes, b.deviation.codes)
    assert torch.equal(a.deviation.scale, b.deviation.scale) and torch.equal(a.deviation.zero, b.deviation.zero)
    torch.testing.assert_close(tada_dequantize(b), tada_dequantize(a) + c, atol=0, rtol=0)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.mT * D**-0.5, dim=-1) @ v


def test_softmax_invariances_that_hold_and_the_one_that_does_not():
    gen = torch.Generator().manual_seed(3)
    x = _grid(gen, (B, H, N, D))
    q = torch.randn(B, H, 2, D, generator=gen)
    v = torch.randn(B, H, N, D, generator=gen)
    c = _grid(gen, (D,))  # one vector for every key of every head and token
    exact = _attention(q, x, v)
    # (1) plain softmax: logits all move by q.c, so the output is unchanged.
    torch.testing.assert_close(_attention(q, x + c, v), exact, atol=1e-5, rtol=1e-4)
    # (2) TaDA-reconstructed keys shift by c, so the TaDA attention is unchanged too.
    deq = tada_dequantize(tada_quantize(x, 4, 16))
    deq_c = tada_dequantize(tada_quantize(x + c, 4, 16))
    torch.testing.assert_close(deq_c, deq + c, atol=0, rtol=0)
    torch.testing.assert_close(_attention(q, deq_c, v), _attention(q, deq, v), atol=1e-5, rtol=1e-4)
    # (3) the per-token mean is not such an offset: attention without it differs.
    mean = x.mean(dim=1, keepdim=True)
    assert (_attention(q, x - mean, v) - exact).abs().max() > 1e-2


@pytest.mark.parametrize("bits_k,bits_v,gs", [(2, 2, 8), (4, 2, 16), (8, 4, 4), (4, 8, 16)])
def test_bytes_per_token_formula_and_held_tensors(bits_k: int, bits_v: int, gs: int):
    def per_side(bits: int) -> int:  # float16 mean, then per head: codes + float16 scale and zero per group
        return 2 * D + H * (D * bits // 8 + 2 * 2 * (D // gs))

    assert bytes_per_token(H, D, bits_k, bits_v, gs) == per_side(bits_k) + per_side(bits_v)
    k, v = tada_quantize(_x(4), bits_k, gs), tada_quantize(_x(5), bits_v, gs)
    held = sum(t.numel() * t.element_size() for t in (k.mean, k.deviation.codes, k.deviation.scale,
                                                     k.deviation.zero, v.mean, v.deviation.codes,
                                                     v.deviation.scale, v.deviation.zero))
    assert k.nbytes + v.nbytes == held == B * N * bytes_per_token(H, D, bits_k, bits_v, gs)


def _simulate_one_by_one(total: int, r: int) -> tuple[int, int]:
    quantized, buffer = 0, 0
    for _ in range(total):
        buffer += 1
        if buffer == r:  # KIVI: a full buffer is quantised as one block
            quantized, buffer = quantized + r, 0
    return quantized, buffer


@pytest.mark.parametrize("r", [1, 4, 7])
def test_residual_flush_matches_token_by_token_buffer(r: int):
    gen = torch.Generator().manual_seed(r)
    quantized, residual, seen = 0, 0, 0
    for arrival in [int(x) for x in torch.randint(1, 12, (15,), generator=gen)]:  # prefill chunks and decode
        residual += arrival
        seen += arrival
        flush = residual_flush(quantized, residual, r)
        if flush is not None:
            count = flush.residual.stop - flush.residual.start
            assert flush.residual.start == 0 and count % r == 0
            assert flush.tokens == slice(quantized, quantized + count)
            quantized, residual = quantized + count, residual - count
        assert residual < r
        assert (quantized, residual) == _simulate_one_by_one(seen, r)


def test_residual_flush_edge_cases():
    assert residual_flush(0, 5, 0).tokens == slice(0, 5)  # no buffer: quantise at once
    assert residual_flush(10, 0, 0) is None
    assert residual_flush(8, 3, 4) is None
    with pytest.raises(ValueError, match="residual_length=-1"):
        residual_flush(0, 3, -1)


def test_fake_quantize_forward_and_identity_gradient():
    x = _x(6).requires_grad_(True)
    out = fake_quantize(x, 2, 8)
    torch.testing.assert_close(out.detach(), tada_dequantize(tada_quantize(x.detach(), 2, 8)))
    upstream = torch.randn_like(x)
    out.backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_bad_inputs():
    x = _x()
    with pytest.raises(ValueError, match="bits=3"):
        tada_quantize(x, 3, 8)
    with pytest.raises(ValueError, match="group_size=5"):
        tada_quantize(x, 4, 5)
    with pytest.raises(ValueError, match=r"x must be \[b, h_kv, n, d\]"):
        tada_quantize(x[0], 4, 8)
    with pytest.raises(ValueError, match="NaN or inf"):
        tada_quantize(x.masked_fill(x > 2, float("nan")), 4, 8)
