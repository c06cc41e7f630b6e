"""Group-wise asymmetric quantisation with real bit packing (the PyTorch reference).

Layout, shared with the Triton kernels in ``kvtrain.kernels``:
* groups of ``group_size`` consecutive elements along the last dim share one scale and one zero point
  (stored as float16), ``x ~= q * scale + zero`` with ``q`` in ``[0, 2**bits - 1]``;
* ``bits`` in {2, 4, 8}; ``8 // bits`` codes share a byte, element ``i`` of a byte's run sitting in bits
  ``[i*bits, (i+1)*bits)`` (lowest bits first), so a ``[..., d]`` tensor packs into ``[..., d * bits // 8]``
  uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 4, 8)


@dataclass
class PackedTensor:
    """A quantised tensor as it is held in memory: codes, per-group scale and zero point."""

    codes: Tensor  # uint8 [..., d * bits // 8]
    scale: Tensor  # float16 [..., d // group_size]
    zero: Tensor  # float16 [..., d // group_size]
    bits: int
    group_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


def _check(d: int, bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; choose one of {SUPPORTED_BITS}")
    if group_size <= 0 or d % group_size:
        raise ValueError(f"group_size={group_size} must be positive and divide the last dimension {d}")
    if (group_size * bits) % 8:
        raise ValueError(f"group_size={group_size} at {bits} bits does not fill whole bytes")


def quantize(x: Tensor, bits: int, group_size: int) -> PackedTensor:
    """Quantise ``x`` group-wise along its last dim and pack the codes."""
    d = x.shape[-1]
    _check(d, bits, group_size)
    groups = x.float().reshape(*x.shape[:-1], d // group_size, group_size)
    lo = groups.amin(dim=-1)
    hi = groups.amax(dim=-1)
    # Scales and zeros are stored in float16; quantise against the stored (rounded) values so that
    # dequantisation reproduces exactly what was encoded.
    scale = ((hi - lo) / (2**bits - 1)).to(torch.float16)
    zero = lo.to(torch.float16)
    safe = torch.where(scale.float() > 0, scale.float(), torch.ones_like(lo))
    q = torch.round((groups - zero.float()[..., None]) / safe[..., None]).clamp_(0, 2**bits - 1)
    return PackedTensor(pack_codes(q.reshape(x.shape).to(torch.uint8), bits), scale, zero, bits, group_size)


def dequantize(p: PackedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    q = unpack_codes(p.codes, p.bits).float()
    groups = q.reshape(*q.shape[:-1], q.shape[-1] // p.group_size, p.group_size)
    x = groups * p.scale.float()[..., None] + p.zero.float()[..., None]
    return x.reshape(q.shape).to(dtype)


def pack_codes(q: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (< 2**bits) along the last dim, lowest bits first."""
    per = 8 // bits
    if q.shape[-1] % per:
        raise ValueError(f"last dim {q.shape[-1]} is not a multiple of {per} codes per byte")
    runs = q.to(torch.int32).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * bits
    return (runs << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32)[..., None] >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)


def packed_bytes_per_vector(d: int, bits: int, group_size: int) -> int:
    """Bytes one packed d-vector occupies: codes + a float16 scale and zero per group."""
    return d * bits // 8 + 2 * 2 * (d // group_size)
