"""KV quantisation: packed group-wise codes (`packing`), TaDA mean-centring (`tada`), per-layer bit plans."""

from __future__ import annotations

from kvtrain.quant.bitplan import (
    Budget,
    QuantPlan,
    QuantPlanError,
    exact_bits,
    greedy_bits,
    plan_bits,
    read_quant_plan,
    write_quant_plan,
)
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
    "Budget",
    "Flush",
    "PackedTensor",
    "QuantPlan",
    "QuantPlanError",
    "TadaTensor",
    "bytes_per_token",
    "dequantize",
    "exact_bits",
    "fake_quantize",
    "greedy_bits",
    "plan_bits",
    "quantize",
    "read_quant_plan",
    "residual_flush",
    "tada_dequantize",
    "tada_quantize",
    "write_quant_plan",
]
