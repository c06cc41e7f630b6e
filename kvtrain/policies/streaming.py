"""StreamingLLM: keep the newest tokens (attention sinks are forced in by selection, not scored here)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvtrain.policies.base import ScoreInputs, Scorer, register_scorer


@register_scorer
@dataclass
class StreamingScorer(Scorer):
    """Score = RoPE position (newest highest). No hyperparameters, no state."""

    name = "streaming"

    def __call__(self, inputs: ScoreInputs, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        # RoPE position rather than column index, so a left-padded row scores exactly like the unpadded one.
        scores = (inputs.positions - inputs.rope_offset[:, None, None]).float()
        return scores.masked_fill(~inputs.valid, 0.0), {}
