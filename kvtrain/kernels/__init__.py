"""Kernels for compressed-cache attention and replay training: Triton on CUDA, PyTorch references elsewhere.

Each functional API follows the one kernel switch (`kvtrain.kernels.dispatch`: ``KVTRAIN_KERNELS`` or ``force=``,
``auto | triton | torch``): Triton on CUDA tensors by default, the PyTorch references (`reference.py`) elsewhere.
"""

from __future__ import annotations

from kvtrain.kernels.decode_attention import decode_attention
from kvtrain.kernels.formats import MeanCentredKV
from kvtrain.kernels.keyset_attention import KeysetAttentionFunction, keyset_attention
from kvtrain.kernels.quant_pack import dequantize, quantize

__all__ = ["KeysetAttentionFunction", "MeanCentredKV", "decode_attention", "dequantize", "keyset_attention", "quantize"]
