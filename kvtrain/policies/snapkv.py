"""SnapKV: mean attention of the observation window, max-pooled along the key axis to keep neighbourhoods."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvtrain.policies.base import ScoreInputs, Scorer, register_scorer


@register_scorer
@dataclass
class SnapKVScorer(Scorer):
    """Mean over the last ``window`` (real) queries of their attention, mean over the GQA group, then a 1-D max
    pool of odd ``kernel_size`` along the position-sorted candidates; invalid slots never win a pool."""

    name = "snapkv"
    window: int = 16
    kernel_size: int = 5

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window={self.window} must be >= 1")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={self.kernel_size} must be a positive odd number")

    def __call__(self, inputs: ScoreInputs, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        attn = inputs.window_attention()[:, :, :, -self.window :, :].mean(dim=2)  # [b, h_kv, w', n]
        mean = inputs.mean_over_real_queries(attn)
        if self.kernel_size > 1:
            b, h, n = mean.shape
            masked = mean.masked_fill(~inputs.valid, float("-inf")).reshape(b * h, 1, n)
            # max_pool1d pads with -inf, so the row edges behave like invalid neighbours.
            pooled = F.max_pool1d(masked, self.kernel_size, stride=1, padding=self.kernel_size // 2)
            mean = pooled.reshape(b, h, n)
        return torch.where(inputs.valid, mean, 0.0), {}
