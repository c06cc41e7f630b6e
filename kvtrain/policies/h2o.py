"""H2O (heavy hitters): keep the keys with the largest attention accumulated over all decoded queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvtrain.policies.base import ScoreInputs, Scorer, register_scorer

GROUP_REDUCTIONS = ("mean", "max")


@register_scorer
@dataclass
class H2OScorer(Scorer):
    """Accumulated attention, carried across events in the state ``acc`` ``[b, h_kv, n]``.

    At each event, every window query newer than the previous event adds its attention (reduced over the
    GQA group with ``group_reduce``) to the running sum of each key. Nothing is evicted between two events,
    so this is exactly the attention those queries had at decode time, and every decoded query is counted
    once, **provided ``query_window >= compression interval``**; with a shorter window the queries that fell
    out of it between two events are missing from the sum (the config warns, naming both fields). At the
    first event only the last ``query_window`` prompt queries are seen (the prefill's earlier queries are not
    kept).
    """

    name = "h2o"
    counts_every_query = True
    group_reduce: str = "mean"

    def __post_init__(self) -> None:
        if self.group_reduce not in GROUP_REDUCTIONS:
            raise ValueError(f"group_reduce={self.group_reduce!r} must be one of {GROUP_REDUCTIONS}")

    def __call__(self, inputs: ScoreInputs, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        attn = inputs.window_attention()  # [b, h_kv, g, w, n]
        attn = attn.mean(dim=2) if self.group_reduce == "mean" else attn.amax(dim=2)
        # Older window queries were already counted at the previous event.
        fresh = inputs.query_positions > inputs.last_event_position  # [w]
        added = (attn * fresh[None, None, :, None]).sum(dim=2)
        acc = added
        if "acc" in state:
            acc = acc + torch.where(inputs.has_history, state["acc"].float(), 0.0)
        acc = acc.masked_fill(~inputs.valid, 0.0)
        return acc, {"acc": acc}
