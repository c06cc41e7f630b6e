"""Split-K decode attention kernel vs the PyTorch reference (dense and TaDA-packed caches)."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, FORWARD_TOL, assert_close  # noqa: I001  (must precede kvtrain.kernels)

from kvtrain.kernels import MeanCentredKV, decode_attention
from kvtrain.kernels.reference import decode_attention_reference
from kvtrain.quant.packing import quantize

pytestmark = pytest.mark.triton
SCALING = 0.35


def _inputs(b: int, h_kv: int, group: int, n: int, dk: int, dv: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h_kv * group, dk, generator=gen)
    k = torch.randn(b, h_kv, n, dk, generator=gen)
    v = torch.randn(b, h_kv, n, dv, generator=gen)
    return (t.to(DEVICE, dtype) for t in (q, k, v))


def _ragged_bias(b: int, h_kv: int, n: int, seed: int = 1) -> torch.Tensor:
    """Log-vote-like biases with per-head kept lengths (-inf tails) and scattered empty slots."""
    gen = torch.Generator().manual_seed(seed)
    bias = torch.rand(b, h_kv, n, generator=gen).log()
    bias[torch.rand(b, h_kv, n, generator=gen) < 0.2] = float("-inf")
    for i in range(b):
        for h in range(h_kv):
            bias[i, h, n - 1 - (7 * i + 13 * h) % n:] = float("-inf")
    return bias.to(DEVICE)


def _mean_centred(x: torch.Tensor, bits: int, group_size: int) -> MeanCentredKV:
    mean = x.float().mean(dim=1).half()
    return MeanCentredKV(mean, quantize(mean.float()[:, None] - x.float(), bits, group_size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 2, 3, 4])
def test_dense_gqa_matches_reference(dtype: torch.dtype, group: int) -> None:
    q, k, v = _inputs(2, 2, group, 70, 32, 32, dtype)
    out = decode_attention(q, k, v, scaling=SCALING, block_n=32, force="triton")
    assert out.dtype == dtype and out.shape == (2, 2 * group, 32)
    assert_close(out, decode_attention_reference(q, k, v, None, SCALING), FORWARD_TOL[dtype], "out")


@pytest.mark.parametrize(("dk", "dv"), [(16, 16), (16, 32), (24, 16)])
def test_key_and_value_dims_may_differ(dk: int, dv: int) -> None:
    q, k, v = _inputs(1, 2, 2, 37, dk, dv, torch.float32)
    out = decode_attention(q, k, v, scaling=SCALING, block_n=16, force="triton")
    assert_close(out, decode_attention_reference(q, k, v, None, SCALING), FORWARD_TOL[torch.float32], "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_ragged_bias_and_key_scores(dtype: torch.dtype, num_splits: int) -> None:
    q, k, v = _inputs(2, 2, 3, 70, 16, 16, dtype)
    bias = _ragged_bias(2, 2, 70)
    bias[1, 0] = float("-inf")  # a head with no key at all
    out, scores = decode_attention(q, k, v, bias=bias, scaling=SCALING, num_splits=num_splits, block_n=16,
                                   return_key_scores=True, force="triton")
    ref_out, ref_scores = decode_attention_reference(q, k, v, bias, SCALING, return_key_scores=True)
    assert_close(out, ref_out, FORWARD_TOL[dtype], "out")
    assert_close(scores, ref_scores, FORWARD_TOL[torch.float32], "key scores")
    assert torch.all(out[1, 0:3] == 0) and torch.all(scores[1, 0] == 0)
    assert torch.all(scores[bias == float("-inf")] == 0)


def test_split_k_agrees_with_single_split() -> None:
    q, k, v = _inputs(1, 1, 2, 130, 16, 16, torch.float32)
    bias = _ragged_bias(1, 1, 130)
    single = decode_attention(q, k, v, bias=bias, scaling=SCALING, num_splits=1, block_n=16, return_key_scores=True, force="triton")
    split = decode_attention(q, k, v, bias=bias, scaling=SCALING, num_splits=5, block_n=16, return_key_scores=True, force="triton")
    for a, b, what in zip(single, split, ("out", "key scores")):
        assert_close(a, b, FORWARD_TOL[torch.float32], what)


def test_strided_cache_view() -> None:
    """A cache preallocated for 96 tokens and read through a [:, :, :50] view."""
    q, k_buf, v_buf = _inputs(2, 2, 2, 96, 16, 16, torch.float16)
    k, v = k_buf[:, :, :50], v_buf[:, :, :50]
    out = decode_attention(q, k, v, scaling=SCALING, block_n=32, force="triton")
    assert_close(out, decode_attention_reference(q, k, v, None, SCALING), FORWARD_TOL[torch.float16], "out")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_keys_and_values(bits: int) -> None:
    q, k, v = _inputs(2, 2, 2, 45, 32, 16, torch.float16)
    kp, vp = _mean_centred(k, bits, 16), _mean_centred(v, bits, 8)
    bias = _ragged_bias(2, 2, 45)
    out, scores = decode_attention(q, kp, vp, bias=bias, scaling=SCALING, k_format="tada", v_format="tada",
                                   num_splits=2, block_n=16, return_key_scores=True, force="triton")
    ref_out, ref_scores = decode_attention_reference(q, kp, vp, bias, SCALING, return_key_scores=True)
    assert_close(out, ref_out, FORWARD_TOL[torch.float16], "out")
    assert_close(scores, ref_scores, FORWARD_TOL[torch.float32], "key scores")


def test_packed_keys_with_dense_values() -> None:
    q, k, v = _inputs(1, 2, 3, 33, 16, 32, torch.float32)
    kp = _mean_centred(k, 4, 16)
    out = decode_attention(q, kp, v, scaling=SCALING, k_format="tada", block_n=32, force="triton")
    assert_close(out, decode_attention_reference(q, kp, v, None, SCALING), FORWARD_TOL[torch.float32], "out")


def test_bad_inputs_are_named() -> None:
    q, k, v = _inputs(1, 2, 2, 20, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="k_format"):
        decode_attention(q, k, v, scaling=SCALING, k_format="int4")
    with pytest.raises(ValueError, match="MeanCentredKV"):
        decode_attention(q, k, v, scaling=SCALING, k_format="tada")
    with pytest.raises(ValueError, match="h_q=4 must be a multiple of h_kv=3"):
        decode_attention(q, k[:, :1].expand(1, 3, 20, 16), v[:, :1].expand(1, 3, 20, 16), scaling=SCALING)
    with pytest.raises(ValueError, match="bias shape"):
        decode_attention(q, k, v, bias=torch.zeros(1, 2, 19, device=DEVICE), scaling=SCALING)
    with pytest.raises(ValueError, match="num_splits=0"):
        decode_attention(q, k, v, scaling=SCALING, num_splits=0, force="triton")
