"""TOVA: keep the keys the newest token attends to most."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvtrain.policies.base import ScoreInputs, Scorer, register_scorer

HEAD_AVERAGES = ("group", "all")


@register_scorer
@dataclass
class TOVAScorer(Scorer):
    """Score = attention of the last window query (the newest token), averaged over query heads.

    ``heads="group"`` averages over the query heads that share each KV head, so every KV head keeps its own set.
    ``heads="all"`` averages over all the layer's query heads, so every KV head keeps the same set: the TOVA
    paper's rule and kvpress's ``TOVAPress``, and the default: it is better on our side-by-side with kvpress at every
    ratio tried (benchmarks/kvpress/why.md).
    """

    name = "tova"
    heads: str = "all"

    def __post_init__(self) -> None:
        if self.heads not in HEAD_AVERAGES:
            raise ValueError(f"heads={self.heads!r} must be one of {HEAD_AVERAGES}")

    def __call__(self, inputs: ScoreInputs, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        scores = inputs.window_attention()[:, :, :, -1, :].mean(dim=2)
        if self.heads == "all":
            scores = mean_over_kv_heads(scores, inputs)
        return scores.masked_fill(~inputs.valid, 0.0), {}


def mean_over_kv_heads(scores: Tensor, inputs: ScoreInputs) -> Tensor:
    """Mean over the KV heads of each position's score ``[b, h_kv, n]``, written back to every slot holding it.

    Heads may hold different positions (head-adaptive selection), so scores are pooled by position, not by slot;
    a head that no longer holds a position contributes 0, as its queries no longer attend to it.
    """
    b, h, n = scores.shape
    slots = inputs.positions.clamp(min=0).reshape(b, h * n)
    pooled = scores.new_zeros(b, int(slots.max()) + 1 if slots.numel() else 1)
    pooled.scatter_add_(1, slots, (scores * inputs.valid).reshape(b, h * n))
    return pooled.gather(1, slots).view(b, h, n) / h
