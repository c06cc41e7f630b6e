"""G-KV: a decayed running max of per-event normalised attention, minus R-KV's key-redundancy penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvtrain.policies.base import ScoreInputs, Scorer, register_scorer

SMOOTHINGS = ("max", "mean", "sum")
DUPLICATE_COSINE = 0.5  # R-KV's threshold for "near-duplicate" keys


def local_attention_score(inputs: ScoreInputs) -> Tensor:
    """Per-event local score ``S^`` ``[b, h_kv, n]``: window attention, max over the GQA group, mean over the
    row's real window queries, divided by its maximum over the valid keys of each head (so max S^ = 1)."""
    attn = inputs.window_attention().amax(dim=2)  # [b, h_kv, w, n]
    score = inputs.mean_over_real_queries(attn)
    score = score.masked_fill(~inputs.valid, 0.0)
    return score / score.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(score.dtype).tiny)


def redundancy_score(keys: Tensor, valid: Tensor) -> Tensor:
    """R-KV redundancy ``R^`` ``[b, h_kv, n]`` in [0, 1] of keys ``[b, h_kv, n, d]`` (higher = more redundant).

    ``C[j, m] = cos(k_j, k_m)`` over valid pairs with the diagonal zeroed; for every key m, the entry
    ``C[j*, m]`` of its most recent near-duplicate ``j* = max{j != m : C[j, m] > 0.5}`` is zeroed, so the newest
    copy of a repeated pattern is the least penalised (G-KV's similarity kernel). Then
    ``R(j) = sum_m C[j, m] / n_valid``, softmax over the valid keys, divided by its maximum.
    """
    k = keys.float()
    unit = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    cos = unit @ unit.transpose(-1, -2)  # [b, h, n(j), n(m)]
    n = k.shape[-2]
    pair = valid[..., :, None] & valid[..., None, :] & ~torch.eye(n, dtype=torch.bool, device=k.device)
    cos = cos.masked_fill(~pair, 0.0)
    # Slots are position-sorted, so the most recent duplicate of column m is the largest row index j.
    rows = torch.arange(n, device=k.device)[:, None].expand(n, n)
    latest = torch.where(cos > DUPLICATE_COSINE, rows, -1).amax(dim=-2)  # [b, h, n(m)]
    newest_dup = (rows == latest[..., None, :]) & (latest[..., None, :] >= 0)
    cos = cos.masked_fill(newest_dup, 0.0)
    n_valid = valid.sum(dim=-1, keepdim=True).clamp(min=1).float()
    raw = (cos.sum(dim=-1) / n_valid).masked_fill(~valid, float("-inf"))
    r = torch.nan_to_num(torch.softmax(raw, dim=-1), nan=0.0)
    return r / r.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(r.dtype).tiny)


@register_scorer
@dataclass
class GKVScorer(Scorer):
    """G-KV global score ``F`` (state ``global_score`` ``[b, h_kv, n]``) mixed with the redundancy penalty.

    ``F = max(alpha * F_prev, S^)`` (``smooth="max"``), ``alpha * F_prev + (1 - alpha) * S^`` (``"mean"``) or
    ``alpha * F_prev + S^`` (``"sum"``) for keys that survived the previous event, ``S^`` for new keys.
    Score ``Z = mix_lambda * F - (1 - mix_lambda) * R^`` (``Z = F`` without redundancy). The state carries
    ``F``, not ``Z``, as in the paper. Unlike the reference code, ``S^`` is normalised over every valid
    candidate, the observation-window keys included, because selection (not the scorer) protects the window.
    """

    name = "gkv"
    alpha: float = 0.8
    smooth: str = "max"
    redundancy: bool = True
    mix_lambda: float = 0.5

    def __post_init__(self) -> None:
        if self.smooth not in SMOOTHINGS:
            raise ValueError(f"smooth={self.smooth!r} must be one of {SMOOTHINGS}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must lie in [0, 1]")
        if not 0.0 <= self.mix_lambda <= 1.0:
            raise ValueError(f"mix_lambda={self.mix_lambda} must lie in [0, 1]")

    def __call__(self, inputs: ScoreInputs, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        local = local_attention_score(inputs)
        glob = local
        if "global_score" in state:
            prev = self.alpha * state["global_score"].float()
            if self.smooth == "max":
                smoothed = torch.maximum(prev, local)
            elif self.smooth == "mean":
                smoothed = prev + (1.0 - self.alpha) * local
            else:
                smoothed = prev + local
            glob = torch.where(inputs.has_history, smoothed, local)
        glob = glob.masked_fill(~inputs.valid, 0.0)
        scores = glob
        if self.redundancy:
            scores = self.mix_lambda * glob - (1.0 - self.mix_lambda) * redundancy_score(inputs.keys, inputs.valid)
        return scores.masked_fill(~inputs.valid, 0.0), {"global_score": glob}
