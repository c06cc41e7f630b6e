"""One compression event of one layer: score -> protect -> select -> (merge) -> gather.

This is the only place where a policy is applied. `CompressedCache` calls it during decoding and
`replay` calls it inside a teacher-forced forward, with the same inputs in the same order, which is what
makes replayed logits equal step-by-step decode logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvtrain.config import LayerPolicy
from kvtrain.policies import ScoreInputs, build_scorer
from kvtrain.policies.keepkv import KeepKVMerger
from kvtrain.policies.select import protected_mask, select

_SCORER_STATE = "scorer."
_MERGE_STATE = "merge."


@dataclass
class StoredKV:
    """What one layer holds between events; dim 2 is sorted by position for every (row, KV head)."""

    keys: Tensor  # [b, h_kv, n, d]
    values: Tensor  # [b, h_kv, n, d]
    positions: Tensor  # [b, h_kv, n] long, -1 for empty slots
    valid: Tensor  # [b, h_kv, n] bool
    has_history: Tensor  # [b, h_kv, n] bool: survived an event
    log_votes: Tensor | None = None  # [b, h_kv, n] when merging
    state: dict[str, Tensor] = field(default_factory=dict)  # per-token policy state, [b, h_kv, n] each

    @classmethod
    def empty(cls, like: Tensor, merging: bool) -> "StoredKV":
        b, h, _, d = like.shape
        zeros = like.new_zeros(b, h, 0)
        return cls(
            keys=like.new_zeros(b, h, 0, d),
            values=like.new_zeros(b, h, 0, d),
            positions=zeros.long(),
            valid=zeros.bool(),
            has_history=zeros.bool(),
            log_votes=zeros.float() if merging else None,
        )

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    def append(self, keys: Tensor, values: Tensor, first_position: int, valid: Tensor) -> "StoredKV":
        """Add new tokens (positions first_position..) after the stored ones; `valid` is [b, q]."""
        b, h, q, _ = keys.shape
        positions = torch.arange(first_position, first_position + q, device=keys.device)
        new_valid = valid[:, None, :].expand(b, h, q)
        votes = None
        if self.log_votes is not None:
            votes = torch.cat([self.log_votes, self.log_votes.new_zeros(b, h, q)], dim=2)
        state = {name: torch.cat([t, t.new_zeros(b, h, q)], dim=2) for name, t in self.state.items()}
        return StoredKV(
            keys=torch.cat([self.keys, keys], dim=2),
            values=torch.cat([self.values, values], dim=2),
            positions=torch.cat([self.positions, positions.expand(b, h, q)], dim=2),
            valid=torch.cat([self.valid, new_valid], dim=2),
            has_history=torch.cat([self.has_history, torch.zeros_like(new_valid)], dim=2),
            log_votes=votes,
            state=state,
        )

    def attention_bias(self) -> Tensor:
        """Additive logit bias over the stored slots: log votes, -inf for empty slots. [b, h_kv, n]."""
        bias = self.log_votes.float() if self.log_votes is not None else self.keys.new_zeros(self.valid.shape).float()
        return bias.masked_fill(~self.valid, float("-inf"))


@dataclass
class EventRecord:
    """Kept positions after one event: `kept` [b, h_kv, k] (column indices, -1 = empty slot)."""

    tokens_seen: int
    kept: Tensor


class LayerCompressor:
    """A layer's policy, built once from its `LayerPolicy`, applied at each event."""

    def __init__(self, policy: LayerPolicy):
        self.policy = policy
        self.scorer = build_scorer(policy.scorer.name, policy.scorer.params)
        merge = policy.merge
        self.merger = (
            KeepKVMerger(threshold=merge.threshold, ema_alpha=merge.ema_alpha, max_rescale=merge.max_rescale)
            if merge
            else None
        )

    def __call__(
        self,
        stored: StoredKV,
        queries: Tensor,
        query_positions: Tensor,
        rope_offset: Tensor,
        tokens_seen: int,
        last_event_position: int,
        scaling: float,
        rope_theta: float,
    ) -> tuple[StoredKV, EventRecord | None]:
        """Run one event. Returns the new stored set and what was kept (None if nothing was evicted)."""
        policy = self.policy
        inputs = ScoreInputs(
            keys=stored.keys,
            values=stored.values,
            positions=stored.positions,
            valid=stored.valid,
            has_history=stored.has_history,
            queries=queries,
            query_positions=query_positions,
            rope_offset=rope_offset,
            scaling=scaling,
            layer_idx=policy.layer_idx,
            last_event_position=last_event_position,
            rope_theta=rope_theta,
            log_votes=stored.log_votes,
        )
        # Scoring and selection are discrete decisions: no gradient flows through them, while the kept
        # keys and values (gathered or merged below) stay differentiable for training.
        with torch.no_grad():
            scorer_state = _prefixed(stored.state, _SCORER_STATE)
            scores, scorer_state = self.scorer(_detached(inputs), scorer_state)
        budget = policy.budget_at(tokens_seen)
        over_budget = int(stored.valid.sum(dim=2).max()) > budget
        if not over_budget:
            # Stateful scorers still account for the queries of this interval.
            state = {**_prefix(scorer_state, _SCORER_STATE), **_pick(stored.state, _MERGE_STATE)}
            return StoredKV(**{**stored.__dict__, "state": state}), None
        with torch.no_grad():
            protected = protected_mask(
                stored.positions,
                stored.valid,
                sinks=policy.sinks,
                recent=policy.recent,
                seen=tokens_seen,
                whitelist=policy.whitelist,
            )
            keep_idx, keep_valid = select(
                scores,
                stored.valid,
                stored.positions,
                budget,
                protected=protected,
                mode=policy.selection,
                safeguard=policy.safeguard,
                spans=policy.fair_spans or None,
            )
        if self.merger is not None:
            keys, values, log_votes, merge_state = self.merger(
                inputs, _prefixed(stored.state, _MERGE_STATE), keep_idx, keep_valid
            )
        else:
            keys, values = _gather(stored.keys, keep_idx), _gather(stored.values, keep_idx)
            log_votes, merge_state = None, {}
        positions = torch.gather(stored.positions, 2, keep_idx).masked_fill(~keep_valid, -1)
        state = {
            **{_SCORER_STATE + k: torch.gather(v, 2, keep_idx) for k, v in scorer_state.items()},
            **_prefix(merge_state, _MERGE_STATE),
        }
        kept = StoredKV(
            keys=keys,
            values=values,
            positions=positions,
            valid=keep_valid,
            has_history=keep_valid.clone(),
            log_votes=log_votes,
            state=state,
        )
        return kept, EventRecord(tokens_seen=tokens_seen, kept=positions)


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(x, 2, idx[..., None].expand(*idx.shape, x.shape[-1]))


def _prefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _pick(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _detached(inputs: ScoreInputs) -> ScoreInputs:
    fields = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in inputs.__dict__.items()}
    return ScoreInputs(**fields)
