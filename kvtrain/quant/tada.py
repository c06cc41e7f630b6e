"""TaDA (docs/methods.md#tada): per-token mean over KV heads kept in float16, deviations quantised group-wise.

For a token t of one layer, ``m_t = (1/H) sum_h x_t^h`` is stored in float16 and each head keeps
``deq(quant(x_t^h - m_t))``; reconstruction is ``x_t^h ~= m_t + deq(...)``. The deviation is taken from the
float16-rounded mean, so the only reconstruction error is that of the deviation codes. (The paper writes
the deviation as ``m - x``; the sign is immaterial for asymmetric quantisation, we use ``x - m``.)

What the centring does and does not change, exactly:
* The codes are invariant to adding any vector ``c_t`` shared by all heads of token t (it moves only the
  mean): a channel outlier common to the heads never reaches the quantiser.
* The mean itself is NOT an attention-invariant offset: it varies with t, so ``q . m_t`` varies across keys
  and dropping it would change the softmax. It has to be stored.
* Softmax over keys is invariant to adding one constant vector c to all keys of a head (the logits all move
  by ``q . c``); such a c (same for every token) shifts every TaDA-reconstructed key by exactly c as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvtrain.quant.packing import PackedTensor, dequantize, packed_bytes_per_vector, quantize

MEAN_DTYPE = torch.float16


@dataclass
class TadaTensor:
    """A TaDA-quantised ``[b, h_kv, n, d]`` tensor: ``mean`` float16 ``[b, 1, n, d]`` and packed deviations."""

    mean: Tensor
    deviation: PackedTensor

    @property
    def nbytes(self) -> int:
        return self.mean.numel() * self.mean.element_size() + self.deviation.nbytes

    @property
    def num_tokens(self) -> int:
        return self.mean.shape[2]


def _check_4d(x: Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be [b, h_kv, n, d], got {tuple(x.shape)}")


def tada_quantize(x: Tensor, bits: int, group_size: int) -> TadaTensor:
    """Mean-centre ``x`` ``[b, h_kv, n, d]`` across KV heads per token and quantise the deviations."""
    _check_4d(x, "x")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf")
    mean = x.float().mean(dim=1, keepdim=True).to(MEAN_DTYPE)
    return TadaTensor(mean, quantize(x.float() - mean.float(), bits, group_size))


def tada_dequantize(t: TadaTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reconstruction ``[b, h_kv, n, d]``: the float16 mean plus the dequantised deviations."""
    return (t.mean.float() + dequantize(t.deviation)).to(dtype)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bits: int, group_size: int) -> Tensor:  # type: ignore[override]
        return tada_dequantize(tada_quantize(x, bits, group_size), x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return grad, None, None


def fake_quantize(x: Tensor, bits: int, group_size: int) -> Tensor:
    """TaDA round trip of ``x`` ``[b, h_kv, n, d]`` for training: forward = dequant(quant(x)), gradient = identity
    (straight-through estimator)."""
    _check_4d(x, "x")
    return _StraightThrough.apply(x, bits, group_size)


def bytes_per_token(num_kv_heads: int, head_dim: int, bits_k: int, bits_v: int, group_size: int) -> int:
    """Bytes one token occupies in one layer's TaDA cache (keys + values, one batch row).

    Per side: a float16 mean ``2 * d`` plus ``h_kv`` packed deviation vectors of
    ``d * bits / 8 + 4 * d / group_size`` bytes (codes, float16 scale and zero per group).
    """
    for name, value in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if value <= 0:
            raise ValueError(f"{name}={value} must be positive")
    mean = head_dim * torch.finfo(MEAN_DTYPE).bits // 8
    return sum(
        mean + num_kv_heads * packed_bytes_per_vector(head_dim, bits, group_size) for bits in (bits_k, bits_v)
    )


@dataclass(frozen=True)
class Flush:
    """Tokens to move from the full-precision residual buffer into the quantised store (the oldest ones).

    ``residual`` indexes the buffer, ``tokens`` the same tokens in the layer's sequence (quantised tokens
    come first, then the buffer).
    """

    residual: slice
    tokens: slice


def residual_flush(num_quantized: int, num_residual: int, residual_length: int) -> Flush | None:
    """KIVI-style buffer policy: once the buffer holds ``residual_length`` (R) tokens, flush its oldest
    ``floor(num_residual / R) * R`` tokens in one batch (a long prefill flushes several blocks at once and
    keeps ``num_residual % R``); ``R = 0`` quantises every token immediately. None when nothing is due."""
    for name, value in (
        ("num_quantized", num_quantized),
        ("num_residual", num_residual),
        ("residual_length", residual_length),
    ):
        if value < 0:
            raise ValueError(f"{name}={value} must be non-negative")
    count = num_residual if residual_length == 0 else (num_residual // residual_length) * residual_length
    if count == 0:
        return None
    return Flush(slice(0, count), slice(num_quantized, num_quantized + count))
