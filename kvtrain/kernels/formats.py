"""Compressed K/V operand formats read by the kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvtrain.quant.packing import PackedTensor, dequantize


@dataclass
class MeanCentredKV:
    """TaDA layout: per-token mean over KV heads plus packed per-head deviations from it.

    ``mean`` is float16 ``[b, n, d]``; ``deviation`` packs ``mean - x`` of shape ``[b, h_kv, n, d]``, so the
    tensor it stands for is ``x = mean - deq(deviation)``.
    """

    mean: Tensor
    deviation: PackedTensor

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h_kv, n, _ = self.deviation.codes.shape
        return b, h_kv, n, self.mean.shape[-1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense ``[b, h_kv, n, d]`` tensor, reconstructed in float32 then cast to ``dtype``."""
        return (self.mean.float()[:, None] - dequantize(self.deviation, torch.float32)).to(dtype)

    def validate(self, name: str) -> None:
        dev = self.deviation
        if self.mean.dim() != 3 or dev.codes.dim() != 4:
            raise ValueError(f"{name}: mean must be [b, n, d] and deviation codes [b, h_kv, n, d*bits/8]")
        b, _, n, d = self.shape
        if tuple(self.mean.shape) != (b, n, d):
            raise ValueError(f"{name}: mean shape {tuple(self.mean.shape)} does not match codes (b={b}, n={n})")
        if dev.codes.shape[-1] * 8 != d * dev.bits:
            raise ValueError(f"{name}: codes last dim {dev.codes.shape[-1]} != d*bits/8 for d={d}, bits={dev.bits}")
        if dev.codes.dtype != torch.uint8:
            raise ValueError(f"{name}: codes must be uint8, got {dev.codes.dtype}")
        groups = d // dev.group_size
        for part in ("scale", "zero"):
            t = getattr(dev, part)
            if tuple(t.shape) != (*dev.codes.shape[:-1], groups):
                raise ValueError(f"{name}: deviation.{part} shape {tuple(t.shape)} != {(*dev.codes.shape[:-1], groups)}")
