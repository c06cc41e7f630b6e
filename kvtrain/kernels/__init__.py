"""Kernels for compressed-cache attention and replay training: Triton on CUDA, PyTorch references elsewhere.

Each functional API dispatches on the tensors' device (CUDA -> Triton, otherwise ``reference.py``) and takes
``force="triton" | "reference"`` to override that.
"""

from __future__ import annotations

from kvtrain.kernels.decode_attention import decode_attention
from kvtrain.kernels.formats import MeanCentredKV
from kvtrain.kernels.keyset_attention import KeysetAttentionFunction, keyset_attention
from kvtrain.kernels.quant_pack import dequantize, quantize

__all__ = ["KeysetAttentionFunction", "MeanCentredKV", "decode_attention", "dequantize", "keyset_attention", "quantize"]
