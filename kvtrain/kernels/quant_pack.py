"""Group-wise quantise-and-pack / unpack-and-dequantise kernels, bit-exact with ``kvtrain.quant.packing``.

The input is viewed as rows of one quantisation group each (groups are consecutive along the last dim), and a
group as ``[bytes, codes per byte]`` so packing is a shift-and-sum along the last axis. Bit-exactness needs:
IEEE-rounded divisions (``tl.div_rn``; plain ``/`` is approximate on NVIDIA GPUs), round-half-to-even like
``torch.round``, no fused multiply-add in the dequantisation (``enable_fp_fusion=False``), and bfloat16 outputs
rounded to nearest even (done by hand: the interpreter truncates).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvtrain.kernels.dispatch import padded, use_triton
from kvtrain.kernels.reference import dequantize_reference, quantize_reference
from kvtrain.quant.packing import SUPPORTED_BITS, PackedTensor

_GROUPS_PER_PROGRAM = 64


@triton.jit
def _round_half_even(y):
    f = tl.floor(y)
    frac = y - f
    is_odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & is_odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _to_bfloat16_rtne(x):
    """float32 -> bfloat16 rounding to nearest even, written out because the interpreter truncates instead."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _quantize_kernel(
    X, CODES, SCALE, ZERO, n_groups,
    BITS: tl.constexpr, NBYTES: tl.constexpr, NBYTES_PAD: tl.constexpr, BLOCK_G: tl.constexpr,
):
    per_byte: tl.constexpr = 8 // BITS
    groups = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    byte_idx = tl.arange(0, NBYTES_PAD)
    slot = tl.arange(0, per_byte)
    mask2 = (groups < n_groups)[:, None] & (byte_idx < NBYTES)[None, :]
    mask3 = mask2[:, :, None]
    offs = groups[:, None, None] * (NBYTES * per_byte) + byte_idx[None, :, None] * per_byte + slot[None, None, :]
    x = tl.load(X + offs, mask=mask3, other=0.0).to(tl.float32)
    lo = tl.min(tl.min(tl.where(mask3, x, float("inf")), axis=2), axis=1)
    hi = tl.max(tl.max(tl.where(mask3, x, float("-inf")), axis=2), axis=1)
    # Groups past the end would carry +-inf into the arithmetic below; give them an empty range instead.
    lo = tl.where(groups < n_groups, lo, 0.0)
    hi = tl.where(groups < n_groups, hi, 0.0)
    scale = tl.div_rn(hi - lo, (1 << BITS) - 1.0).to(tl.float16)
    zero = lo.to(tl.float16)
    # Quantise against the stored float16 scale/zero, as the reference does.
    scale32 = scale.to(tl.float32)
    safe = tl.where(scale32 > 0, scale32, 1.0)
    y = tl.div_rn(x - zero.to(tl.float32)[:, None, None], safe[:, None, None])
    q = tl.minimum(tl.maximum(_round_half_even(y), 0.0), (1 << BITS) - 1.0).to(tl.int32)
    packed = tl.sum(q << (slot * BITS)[None, None, :], axis=2)
    tl.store(CODES + groups[:, None] * NBYTES + byte_idx[None, :], packed.to(tl.uint8), mask=mask2)
    tl.store(SCALE + groups, scale, mask=groups < n_groups)
    tl.store(ZERO + groups, zero, mask=groups < n_groups)


@triton.jit
def _dequantize_kernel(
    CODES, SCALE, ZERO, X, n_groups,
    BITS: tl.constexpr, NBYTES: tl.constexpr, NBYTES_PAD: tl.constexpr, BLOCK_G: tl.constexpr,
):
    per_byte: tl.constexpr = 8 // BITS
    groups = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    byte_idx = tl.arange(0, NBYTES_PAD)
    slot = tl.arange(0, per_byte)
    mask2 = (groups < n_groups)[:, None] & (byte_idx < NBYTES)[None, :]
    packed = tl.load(CODES + groups[:, None] * NBYTES + byte_idx[None, :], mask=mask2, other=0).to(tl.int32)
    codes = (packed[:, :, None] >> (slot * BITS)[None, None, :]) & ((1 << BITS) - 1)
    scale = tl.load(SCALE + groups, mask=groups < n_groups, other=0.0).to(tl.float32)
    zero = tl.load(ZERO + groups, mask=groups < n_groups, other=0.0).to(tl.float32)
    x = codes.to(tl.float32) * scale[:, None, None] + zero[:, None, None]
    offs = groups[:, None, None] * (NBYTES * per_byte) + byte_idx[None, :, None] * per_byte + slot[None, None, :]
    if X.dtype.element_ty == tl.bfloat16:
        out = _to_bfloat16_rtne(x)
    else:
        out = x.to(X.dtype.element_ty)
    tl.store(X + offs, out, mask=mask2[:, :, None])


def _check(d: int, bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; choose one of {SUPPORTED_BITS}")
    if group_size <= 0 or d % group_size or (group_size * bits) % 8:
        raise ValueError(f"group_size={group_size} must divide d={d} and fill whole bytes at {bits} bits")


def quantize(x: Tensor, bits: int, group_size: int, *, force: str | None = None) -> PackedTensor:
    """Quantise ``x [..., d]`` group-wise along d and pack: codes uint8 ``[..., d*bits/8]``, scale and zero
    float16 ``[..., d/group_size]``; identical to ``kvtrain.quant.packing.quantize``. ``force``: see
    `kvtrain.kernels.dispatch`."""
    if x.dim() == 0 or not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor with a last dim, got {x.dtype} of shape {tuple(x.shape)}")
    d = x.shape[-1]
    _check(d, bits, group_size)
    if not use_triton(force, x.device):
        return quantize_reference(x, bits, group_size)
    lead = x.shape[:-1]
    n_groups = x.numel() // group_size
    nbytes = group_size * bits // 8
    codes = torch.empty(*lead, d * bits // 8, device=x.device, dtype=torch.uint8)
    scale = torch.empty(*lead, d // group_size, device=x.device, dtype=torch.float16)
    zero = torch.empty_like(scale)
    if n_groups:
        _quantize_kernel[(triton.cdiv(n_groups, _GROUPS_PER_PROGRAM),)](
            x.contiguous(), codes, scale, zero, n_groups,
            BITS=bits, NBYTES=nbytes, NBYTES_PAD=padded(nbytes, 1), BLOCK_G=_GROUPS_PER_PROGRAM,
        )
    return PackedTensor(codes, scale, zero, bits, group_size)


def dequantize(p: PackedTensor, dtype: torch.dtype = torch.float32, *, force: str | None = None) -> Tensor:
    """Unpack and dequantise to ``[..., d]`` in ``dtype``; identical to ``kvtrain.quant.packing.dequantize``."""
    d = p.codes.shape[-1] * 8 // p.bits if p.bits in SUPPORTED_BITS else 0
    _check(d, p.bits, p.group_size)
    if p.codes.dtype != torch.uint8 or p.scale.shape != p.zero.shape or p.scale.shape[-1] != d // p.group_size:
        raise ValueError(f"inconsistent PackedTensor: codes {p.codes.dtype} {tuple(p.codes.shape)}, scale "
                         f"{tuple(p.scale.shape)}, zero {tuple(p.zero.shape)}, group_size {p.group_size}")
    if not use_triton(force, p.codes.device):
        return dequantize_reference(p, dtype)
    out = torch.empty(*p.codes.shape[:-1], d, device=p.codes.device, dtype=dtype)
    n_groups = out.numel() // p.group_size
    nbytes = p.group_size * p.bits // 8
    if n_groups:
        _dequantize_kernel[(triton.cdiv(n_groups, _GROUPS_PER_PROGRAM),)](
            p.codes.contiguous(), p.scale.contiguous(), p.zero.contiguous(), out, n_groups,
            BITS=p.bits, NBYTES=nbytes, NBYTES_PAD=padded(nbytes, 1), BLOCK_G=_GROUPS_PER_PROGRAM,
            enable_fp_fusion=False,
        )
    return out
