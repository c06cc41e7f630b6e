"""TOVA: keep the keys the newest token attends to most."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvtrain.policies.base import ScoreInputs, Scorer, register_scorer


@register_scorer
@dataclass
class TOVAScorer(Scorer):
    """Score = attention of the last window query (the newest token), averaged over the GQA group."""

    name = "tova"

    def __call__(self, inputs: ScoreInputs, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        scores = inputs.window_attention()[:, :, :, -1, :].mean(dim=2)
        return scores.masked_fill(~inputs.valid, 0.0), {}
