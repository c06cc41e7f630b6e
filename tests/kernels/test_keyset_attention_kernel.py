"""Keep-set attention kernels (forward and backward) vs the interval-loop PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, FORWARD_TOL, GRAD_TOL, assert_close  # noqa: I001  (must precede kvtrain.kernels)

from kvtrain.kernels import keyset_attention
from kvtrain.kernels.reference import keyset_attention_reference

pytestmark = pytest.mark.triton
SCALING = 0.3
NEG_INF = float("-inf")


def _case(b: int, h_kv: int, group: int, seq_len: int, d: int, kept: int, starts: list[int], dtype: torch.dtype, seed: int = 0):
    """Inputs with interval 0 free of kept entries (plain causal prefill) and ragged, partly empty keep-sets."""
    gen = torch.Generator().manual_seed(seed)
    n_events = len(starts)
    q = torch.randn(b, h_kv * group, seq_len, d, generator=gen)
    k = torch.randn(b, h_kv, seq_len, d, generator=gen)
    v = torch.randn(b, h_kv, seq_len, d, generator=gen)
    kept_k = torch.randn(n_events, b, h_kv, kept, d, generator=gen)
    kept_v = torch.randn(n_events, b, h_kv, kept, d, generator=gen)
    bias = torch.rand(n_events, b, h_kv, kept, generator=gen).log()
    bias[torch.rand(n_events, b, h_kv, kept, generator=gen) < 0.25] = NEG_INF
    bias[0] = NEG_INF
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v, kept_k, kept_v)]
    return leaves, bias.to(DEVICE)


def _check_parity(leaves, bias, starts, dtype, key_padding=None, block=16) -> None:
    out = keyset_attention(*leaves, bias, starts, SCALING, key_padding=key_padding, block_m=block, block_n=block, force="triton")
    ref = keyset_attention_reference(*leaves, bias, starts, SCALING, key_padding)
    assert out.dtype == dtype
    assert_close(out, ref, FORWARD_TOL[dtype], "out")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    for name, g, r in zip(("q", "k", "v", "kept_k", "kept_v"), grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g, r, GRAD_TOL[dtype], f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 2, 3])
def test_matches_reference_s37(dtype: torch.dtype, group: int) -> None:
    starts = [0, 9, 30]
    leaves, bias = _case(1, 2, group, 37, 16, 5, starts, dtype)
    _check_parity(leaves, bias, starts, dtype)


@pytest.mark.parametrize("group", [1, 4])
def test_matches_reference_s70_d32(group: int) -> None:
    """Blocks spanning several events, a one-row interval, and 20 kept entries over two kept blocks."""
    starts = [0, 20, 21, 40, 64]
    leaves, bias = _case(2, 1, group, 70, 32, 20, starts, torch.float32)
    _check_parity(leaves, bias, starts, torch.float32)


def test_left_padding_and_dead_rows() -> None:
    """Left-padded rows attend nothing (zeros, zero gradients); padded keys are never attended."""
    starts = [0, 15, 27]
    leaves, bias = _case(2, 2, 2, 37, 16, 4, starts, torch.float32)
    key_padding = torch.ones(2, 37, dtype=torch.bool, device=DEVICE)
    key_padding[1, :6] = False
    key_padding[0, 20] = False  # a hole in the middle of an interval
    _check_parity(leaves, bias, starts, torch.float32, key_padding)
    out = keyset_attention(*leaves, bias, starts, SCALING, key_padding=key_padding, block_m=16, block_n=16, force="triton")
    assert torch.all(out[1, :, :6] == 0)


def test_empty_interval_and_tensor_starts() -> None:
    starts = torch.tensor([0, 12, 12, 25])  # event 1 covers no row
    leaves, bias = _case(1, 2, 2, 37, 16, 3, starts.tolist(), torch.float32)
    _check_parity(leaves, bias, starts, torch.float32)


def test_single_interval_without_kept_entries_is_causal_attention() -> None:
    leaves, bias = _case(1, 2, 2, 37, 16, 0, [0], torch.float32)
    q, k, v = leaves[:3]
    out = keyset_attention(*leaves, bias, [0], SCALING, block_m=32, block_n=32, force="triton")
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=SCALING)
    assert_close(out, expected, FORWARD_TOL[torch.float32], "out")
    _check_parity(leaves, bias, [0], torch.float32)


def test_block_sizes_agree() -> None:
    starts = [0, 10, 33]
    leaves, bias = _case(1, 1, 2, 37, 16, 6, starts, torch.float32)
    small = keyset_attention(*leaves, bias, starts, SCALING, block_m=16, block_n=16, force="triton")
    large = keyset_attention(*leaves, bias, starts, SCALING, block_m=64, block_n=32, force="triton")
    assert_close(small, large, FORWARD_TOL[torch.float32], "out")


def test_bad_inputs_are_named() -> None:
    starts = [0, 10]
    leaves, bias = _case(1, 1, 1, 20, 16, 2, starts, torch.float32)
    with pytest.raises(ValueError, match="starts must begin with 0"):
        keyset_attention(*leaves, bias, [3, 10], SCALING, force="triton")
    with pytest.raises(ValueError, match="non-decreasing"):
        keyset_attention(*leaves, bias, [0, 25], SCALING, force="triton")
    with pytest.raises(ValueError, match="kept_k shape"):
        keyset_attention(*leaves, bias, [0], SCALING)
    with pytest.raises(ValueError, match="kept_bias requires grad"):
        keyset_attention(*leaves, bias.clone().requires_grad_(), starts, SCALING)
    with pytest.raises(ValueError, match="key_padding"):
        keyset_attention(*leaves, bias, starts, SCALING, key_padding=torch.ones(1, 20, device=DEVICE))
    with pytest.raises(ValueError, match="block_m=24"):
        keyset_attention(*leaves, bias, starts, SCALING, block_m=24)
