"""When compression happens: the event schedule that the cache follows while decoding and replay reproduces.

A sequence of S tokens of which the first P are prefilled: the cache receives the prefill in one forward or in
chunks of ``schedule.prefill_chunk`` tokens, then one token per decode step. An event (compression) follows
each prefill chunk (when ``compress_prefill``) and every ``interval``-th decode step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvtrain.config import ScheduleConfig


class EventClock:
    """A cache layer's side of the schedule: `tick(q_len)` after each forward says whether an event is due."""

    def __init__(self, schedule: ScheduleConfig):
        self.schedule = schedule
        self.decode_steps = 0

    def tick(self, q_len: int) -> bool:
        if q_len > 1:  # a prefill chunk
            self.decode_steps = 0
            return self.schedule.compress_prefill
        self.decode_steps += 1
        return self.decode_steps % self.schedule.interval == 0


def event_points(schedule: ScheduleConfig, prefill_len: int, seq_len: int) -> list[int]:
    """Tokens seen at each compression event that precedes a query of a `seq_len`-token sequence.

    Mirrors `EventClock`: an event after each prefill chunk (when `compress_prefill`), then one
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


def forward_starts(seq_len: int, prefill_len: int, prefill_chunk: int | None, device) -> Tensor:
    """``[S]``: the first row of the forward each row belongs to in the cache (chunk start, or itself)."""
    starts = torch.arange(seq_len, device=device)
    for start, end in prefill_chunks(prefill_len, prefill_chunk) if prefill_len else []:
        starts[start:end] = start
    return starts


def archived_before(starts: Tensor, points: list[int]) -> Tensor:
    """``[S]``: per row, the tokens seen at the last event that precedes its forward (0 if none)."""
    last = torch.zeros_like(starts)
    for p in points:
        last = torch.where(starts >= p, torch.full_like(starts, p), last)
    return last
