"""The policy contract: a scorer turns one compression event's tensors into per-key scores.

Every eviction policy is a small dataclass registered by name. The cache (inference), replay (training) and
evaluation all call the same scorer through `kvtrain.runtime.compressor.LayerCompressor`, so a policy is
written once. A scorer never touches a cache object, a module or a hook: it reads `ScoreInputs`, returns scores,
and returns whatever per-token history it wants carried to the next event.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvtrain.models.rope import RopeFn, default_rope
from kvtrain.typecheck import type_error


@dataclass
class ScoreInputs:
    """Everything one layer exposes at one compression event.

    Candidates (the stored keys plus every key added since the previous event) are sorted by position
    along dim 2 for each (batch row, KV head); rows may hold empty slots (``valid`` False) when heads keep
    different numbers of tokens.
    """

    keys: Tensor  # [b, h_kv, n, d] post-RoPE keys
    values: Tensor  # [b, h_kv, n, d]
    positions: Tensor  # [b, h_kv, n] long: column index in the (left-padded) sequence; -1 for empty slots
    valid: Tensor  # [b, h_kv, n] bool: False for left padding and empty slots
    has_history: Tensor  # [b, h_kv, n] bool: True for keys that survived the previous event
    queries: Tensor  # [b, h_q, w, d] post-RoPE queries of the last w tokens seen (observation window)
    query_positions: Tensor  # [w] long: column index of each window query (same for every row)
    rope_offset: Tensor  # [b] long: left-pad count; RoPE position = column index - rope_offset
    scaling: float  # the model's attention scaling (head_dim ** -0.5 for Llama-family models)
    layer_idx: int
    last_event_position: int  # column index of the previous event's last token, -1 before the first event
    rope_theta: float = 10000.0  # RoPE base of `rope_tables` when no `rope` is given (tensors made by hand)
    log_votes: Tensor | None = None  # [b, h_kv, n] log vote counts when merging is on, else None
    rope: RopeFn | None = None  # the model's own rotary embedding (rope scaling included); the runtime sets it

    def rope_tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin ``[b, n, d]`` (float32) of RoPE positions ``[b, n]``, for scorers that rotate or un-rotate
        queries: the model's rotary embedding (`rope`), else the default RoPE of base `rope_theta`."""
        rope = self.rope or default_rope(self.queries.shape[-1], self.rope_theta)
        cos, sin = rope(positions)
        return cos.float(), sin.float()

    @property
    def group_size(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    def grouped_queries(self) -> Tensor:
        """Queries reshaped to [b, h_kv, g, w, d] so that group g of KV head h is queries[:, h*g:(h+1)*g]."""
        b, hq, w, d = self.queries.shape
        return self.queries.view(b, self.keys.shape[1], hq // self.keys.shape[1], w, d)

    def real_queries(self) -> Tensor:
        """[b, w] bool: window queries that are the row's own tokens, not left padding."""
        return self.query_positions[None, :] >= self.rope_offset[:, None]

    def mean_over_real_queries(self, per_query: Tensor) -> Tensor:
        """Mean of `per_query` [b, h, w', n] over the row's real queries among the last w' window queries, so
        that a left-padded row scores like the same row unpadded."""
        real = self.real_queries()[:, -per_query.shape[2] :].to(per_query.dtype)
        return (per_query * real[:, None, :, None]).sum(dim=2) / real.sum(dim=1).clamp(min=1.0)[:, None, None]

    def window_attention(self) -> Tensor:
        """Softmax attention of each window query over the candidates: [b, h_kv, g, w, n].

        Causal (a query never sees a later key), blind to invalid slots, and including the vote bias when
        merging is on: exactly the distribution those queries had when they were decoded, because nothing
        is evicted between two events.
        """
        q = self.grouped_queries().float()
        logits = torch.einsum("bhgwd,bhnd->bhgwn", q, self.keys.float()) * self.scaling
        if self.log_votes is not None:
            logits = logits + self.log_votes[:, :, None, None, :]
        visible = self.valid[:, :, None, None, :] & (
            self.positions[:, :, None, None, :] <= self.query_positions[None, None, None, :, None]
        )
        logits = logits.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.nan_to_num(probs, nan=0.0)


@dataclass
class Scorer:
    """Base class: subclasses are dataclasses whose fields are the policy's hyperparameters.

    ``__call__`` returns ``(scores, state)``: scores ``[b, h_kv, n]`` (higher = keep; invalid slots are
    ignored by selection, whatever their score) and a dict of per-token tensors ``[b, h_kv, n]`` aligned
    with the candidates. The caller gathers that dict at the kept indices and hands it back at the next
    event (aligned with the new candidates, zero where ``has_history`` is False).
    """

    name: ClassVar[str] = ""
    # True for a scorer meant to account for every decoded query (H2O): its window must span an interval.
    counts_every_query: ClassVar[bool] = False

    def __call__(self, inputs: ScoreInputs, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def bind(self, model) -> None:
        """Called once with the model when the runtime builds the scorer: a scorer with learned parameters
        (the retention gates) takes them from the model here, so that training updates reach it."""

    def discards(self, inputs: ScoreInputs, scores: Tensor) -> Tensor | None:
        """Candidates ``[b, h_kv, n]`` bool to evict at this event whatever the budget (threshold policies), or
        None. Protected keys (sinks, recent, whitelist) are kept all the same."""
        return None

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def param_type_error(cls, name: str, value: object) -> str | None:
        """What parameter `name` must be when `value` does not fit its annotation (None when it does): a config
        is checked when it is loaded, not when the scorer first runs."""
        return type_error(value, typing.get_type_hints(cls)[name])


SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make a scorer available by its ``name`` in configs and on the command line."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty class attribute `name`")
    if cls.name in SCORERS and SCORERS[cls.name] is not cls:
        raise ValueError(f"scorer name {cls.name!r} is already registered by {SCORERS[cls.name].__name__}")
    SCORERS[cls.name] = cls
    return cls


def build_scorer(name: str, params: dict | None = None) -> Scorer:
    """Instantiate a registered scorer; unknown names and parameters raise errors that name them."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; registered scorers: {', '.join(sorted(SCORERS))}")
    cls = SCORERS[name]
    params = dict(params or {})
    unknown = set(params) - cls.field_names()
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {sorted(unknown)} for scorer {name!r}; allowed: {sorted(cls.field_names())}"
        )
    return cls(**params)
