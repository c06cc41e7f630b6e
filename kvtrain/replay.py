"""Replay: the compressed cache's attention pattern, reproduced in one teacher-forced forward.

Inside `replay_compression(model, config, prefill_len=P)`, every attention layer of a full-sequence
forward simulates the cache's schedule on that layer's own queries, keys and values: events after each
prefill chunk and every `interval` decode steps, each applying the *same* `LayerCompressor` to the same
candidates and query window that the cache would hold. Queries between two events attend the keep-set of
the earlier event plus the causal keys since it. Keep-sets are index lists (per event, row and KV head);
no S x S mask is ever built. Gradients flow through the kept keys and values, not through selection.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvtrain.attention import attend_with_stored, key_validity, use_kvtrain_attention
from kvtrain.compress import EventRecord, LayerCodecs, LayerCompressor, StoredKV, build_compressors
from kvtrain.config import KVCompressionConfig, ScheduleConfig
from kvtrain.models import check_supported
from kvtrain.rope import rope_theta

_ACTIVE: contextvars.ContextVar["Replay | None"] = contextvars.ContextVar("kvtrain_replay", default=None)


def active_replay() -> "Replay | None":
    return _ACTIVE.get()


def event_points(schedule: ScheduleConfig, prefill_len: int, seq_len: int) -> list[int]:
    """Tokens seen at each compression event that precedes a query of a `seq_len`-token sequence.

    Mirrors `CompressedLayer`: an event after each prefill chunk (when `compress_prefill`), then one
    after every `interval`-th single-token decode step.
    """
    points = []
    if schedule.compress_prefill and prefill_len > 0:
        points += [end for _, end in prefill_chunks(prefill_len, schedule.prefill_chunk)]
    points += list(range(prefill_len + schedule.interval, seq_len, schedule.interval))
    return [p for p in points if p < seq_len]


def prefill_chunks(prefill_len: int, chunk: int | None) -> list[tuple[int, int]]:
    """[start, end) of each prefill forward: one forward, or chunks of `chunk` tokens."""
    step = chunk or prefill_len
    return [(start, min(start + step, prefill_len)) for start in range(0, prefill_len, step)]


@dataclass
class Replay:
    """The state of one replayed forward: per-layer compressors and, when asked, their records."""

    compressors: list[LayerCompressor | None]
    schedule: ScheduleConfig
    prefill_len: int
    rope_theta: float
    record: bool
    records: list[list[EventRecord]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.records = [[] for _ in self.compressors]

    def attend(
        self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, scaling: float
    ) -> Tensor:
        """Attention of a whole teacher-forced sequence under the replayed keep-sets: [b, h_q, S, d_v]."""
        b, _, seq_len, _ = query.shape
        if seq_len < self.prefill_len:
            raise ValueError(f"replay got a {seq_len}-token sequence but prefill_len={self.prefill_len}")
        valid = key_validity(attention_mask, seq_len, batch=b, device=query.device)
        compressor = self.compressors[layer_idx]
        points = event_points(self.schedule, self.prefill_len, seq_len) if compressor is not None else []
        stored = StoredKV.empty(
            key,
            merging=compressor is not None and compressor.merger is not None,
            codecs=compressor.codecs if compressor is not None else LayerCodecs(),
            straight_through=True,
        )
        window = compressor.policy.query_window if compressor is not None else 0
        rope_offset = (~valid[:, : self.prefill_len]).sum(dim=1)
        outputs = []
        last_event = -1
        for start, end in zip([0] + points, points + [seq_len]):
            outputs.append(
                attend_with_stored(
                    query[:, :, start:end],
                    stored.keys,
                    stored.values,
                    stored.attention_bias(),
                    key[:, :, start:end],
                    value[:, :, start:end],
                    valid[:, start:end],
                    scaling,
                )
            )
            if end == seq_len:
                break
            stored = stored.append(key[:, :, start:end], value[:, :, start:end], start, valid[:, start:end])
            first_query = max(0, end - window)
            stored, record = compressor(
                stored,
                query[:, :, first_query:end],
                torch.arange(first_query, end, device=query.device),
                rope_offset,
                tokens_seen=end,
                last_event_position=last_event,
                scaling=scaling,
                rope_theta=self.rope_theta,
            )
            last_event = end - 1
            if record is not None and self.record:
                self.records[layer_idx].append(record)
        return torch.cat(outputs, dim=2)


@contextlib.contextmanager
def replay_compression(model, config: KVCompressionConfig, *, prefill_len: int, record: bool = False):
    """Within this block, full-sequence forwards of `model` attend as the compressed cache would.

    `prefill_len` is the number of tokens the cache would have received in multi-token (prefill)
    forwards; every later token counts as one decode step. Yields the `Replay`, whose `records` hold
    the kept positions per layer and event when `record=True`.
    """
    check_supported(model.config)
    use_kvtrain_attention(model)
    compressors = build_compressors(config, model.config)
    replay = Replay(compressors, config.schedule, prefill_len, rope_theta(model.config), record)
    token = _ACTIVE.set(replay)
    try:
        yield replay
    finally:
        _ACTIVE.reset(token)
