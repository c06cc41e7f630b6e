"""KV quantisation: packed group-wise codes (`packing`), TaDA mean-centring (`tada`), per-layer bit plans
(`bitplan`; the plan file format is `kvtrain.artifacts.quant_plan`)."""

from __future__ import annotations

from kvtrain.quant.bitplan import exact_bits, greedy_bits, plan_bits
from kvtrain.quant.packing import PackedTensor, dequantize, quantize
from kvtrain.quant.tada import (
    Flush,
    TadaTensor,
    bytes_per_token,
    fake_quantize,
    residual_flush,
    tada_dequantize,
    tada_quantize,
)

__all__ = [
    "Flush",
    "PackedTensor",
    "TadaTensor",
    "bytes_per_token",
    "dequantize",
    "exact_bits",
    "fake_quantize",
    "greedy_bits",
    "plan_bits",
    "quantize",
    "residual_flush",
    "tada_dequantize",
    "tada_quantize",
]
