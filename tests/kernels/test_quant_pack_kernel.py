"""Quantise-and-pack / dequantise kernels: bit-exact against kvtrain.quant.packing."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE  # noqa: I001  (must precede kvtrain.kernels)

from kvtrain.kernels import dequantize, quantize
from kvtrain.quant import packing

pytestmark = pytest.mark.triton


def _assert_same_packing(actual: packing.PackedTensor, expected: packing.PackedTensor) -> None:
    assert (actual.bits, actual.group_size) == (expected.bits, expected.group_size)
    for part in ("codes", "scale", "zero"):
        a, e = getattr(actual, part), getattr(expected, part)
        assert a.dtype == e.dtype and a.shape == e.shape, part
        assert torch.equal(a, e), f"{part}: {(a != e).sum().item()} of {a.numel()} differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [8, 16, 24])
def test_quantize_and_dequantize_bit_exact(dtype: torch.dtype, bits: int, group_size: int) -> None:
    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    x = (torch.randn(3, 5, 48, generator=gen) * 4).to(DEVICE, dtype)
    x[0, 0, :group_size] = 1.5  # a constant group: scale 0
    packed = quantize(x, bits, group_size, force="triton")
    expected = packing.quantize(x, bits, group_size)
    _assert_same_packing(packed, expected)
    for out_dtype in (torch.float32, dtype):
        assert torch.equal(dequantize(expected, out_dtype, force="triton"), packing.dequantize(expected, out_dtype))


def test_rounding_ties_go_to_even() -> None:
    """Range 0..6 at 2 bits gives scale 2 and quotients with .5 ties, which torch.round sends to even."""
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.0]], device=DEVICE)
    packed = quantize(x, 2, 8, force="triton")
    codes = packing.unpack_codes(packed.codes, 2)
    assert codes.tolist() == [[0, 0, 1, 2, 2, 2, 3, 3]]
    _assert_same_packing(packed, packing.quantize(x, 2, 8))


def test_odd_leading_shape_and_many_programs() -> None:
    """More groups than one program holds, with a partial last program."""
    x = torch.randn(7, 3, 11, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    _assert_same_packing(quantize(x, 4, 16, force="triton"), packing.quantize(x, 4, 16))


def test_bad_arguments_are_named() -> None:
    x = torch.randn(2, 24, device=DEVICE)
    with pytest.raises(ValueError, match="bits=3"):
        quantize(x, 3, 8)
    with pytest.raises(ValueError, match="group_size=16"):
        quantize(x, 4, 16)
    with pytest.raises(ValueError, match="group_size=2"):
        quantize(x, 2, 2)
    with pytest.raises(ValueError, match="floating"):
        quantize(x.to(torch.int32), 4, 8)
