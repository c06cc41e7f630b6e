"""Norm-based, attention-free scorers: KNorm (low key norm = important) and InfiniPot-V VaN (value norm)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvtrain.policies.base import ScoreInputs, Scorer, register_scorer


@register_scorer
@dataclass
class KeyNormScorer(Scorer):
    """Score = -||k||_2 per (row, KV head, key): keys with a small norm attract the most attention (KNorm)."""

    name = "key_norm"

    def __call__(self, inputs: ScoreInputs, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        scores = -inputs.keys.float().norm(dim=-1)
        return scores.masked_fill(~inputs.valid, 0.0), {}


@register_scorer
@dataclass
class ValueNormScorer(Scorer):
    """Score = ||v||_2 per (row, KV head, key): InfiniPot-V's VaN, a query-agnostic proxy for semantic weight."""

    name = "value_norm"

    def __call__(self, inputs: ScoreInputs, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        scores = inputs.values.float().norm(dim=-1)
        return scores.masked_fill(~inputs.valid, 0.0), {}
