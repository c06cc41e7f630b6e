"""Shared test helpers: random `ScoreInputs` with GQA, empty slots, left padding and history; a loop reference
of window attention; and a left-padding transform for the padding-invariance tests."""

from __future__ import annotations

import math

import torch

from kvtrain.policies.base import ScoreInputs

GARBAGE = 1.0e3  # written into invalid slots: a scorer that reads them gives visibly wrong valid scores


def make_inputs(
    seed: int,
    b: int = 2,
    h_kv: int = 2,
    g: int = 3,
    n: int = 23,
    d: int = 8,
    w: int = 5,
    columns: int = 30,
    rope_offset: tuple[int, ...] = (0, 4),
    last_event_position: int = 27,
) -> ScoreInputs:
    """Random inputs: per (row, head) a few empty slots (-1) first, then sorted distinct columns; columns before
    the row's ``rope_offset`` are left padding. Some keys are near-duplicates so that redundancy terms fire."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h_kv, n, d, generator=gen)
    for dup, orig in ((7, 3), (12, 3), (18, 10)):
        if dup >= n:
            continue
        keys[:, :, dup] = keys[:, :, orig] + 0.1 * torch.randn(b, h_kv, d, generator=gen)
    values = torch.randn(b, h_kv, n, d, generator=gen)
    queries = torch.randn(b, h_kv * g, w, d, generator=gen)
    positions = torch.empty(b, h_kv, n, dtype=torch.long)
    for bi in range(b):
        for hi in range(h_kv):
            n_empty = (bi + 2 * hi) % 3
            cols = torch.randperm(columns, generator=gen)[: n - n_empty].sort().values
            positions[bi, hi] = torch.cat((torch.full((n_empty,), -1), cols))
    offsets = torch.tensor(rope_offset, dtype=torch.long)
    valid = positions >= offsets[:, None, None]
    keys[~valid] = GARBAGE
    values[~valid] = GARBAGE
    has_history = valid & (positions <= last_event_position) & (torch.rand(b, h_kv, n, generator=gen) < 0.7)
    return ScoreInputs(
        keys=keys,
        values=values,
        positions=positions,
        valid=valid,
        has_history=has_history,
        queries=queries,
        query_positions=torch.arange(columns - w, columns),
        rope_offset=offsets,
        scaling=d**-0.5,
        layer_idx=0,
        last_event_position=last_event_position,
        rope_theta=10000.0,
    )


def make_state(inputs: ScoreInputs, seed: int) -> dict[str, torch.Tensor]:
    """A previous-event state for every stateful scorer, with garbage where there is no history."""
    gen = torch.Generator().manual_seed(seed)
    shape = inputs.valid.shape
    garbage = torch.full(shape, GARBAGE)
    acc = torch.where(inputs.has_history, 3 * torch.rand(shape, generator=gen), garbage)
    glob = torch.where(inputs.has_history, torch.rand(shape, generator=gen), garbage)
    return {"acc": acc, "global_score": glob}


def left_pad(inputs: ScoreInputs, state: dict[str, torch.Tensor], pad: int, pad_queries: int = 0):
    """The same batch left-padded by ``pad`` more columns: ``pad`` invalid slots (garbage) prepended to every
    (row, head) and, optionally, ``pad_queries`` padding queries (garbage) prepended to the window. Returns the
    padded inputs and state; scores of slot ``pad + j`` must equal the unpadded scores of slot ``j``."""
    b, h_kv, n, d = inputs.keys.shape
    if pad_queries:
        first_real = int(inputs.rope_offset.min())
        if pad_queries > pad or int(inputs.query_positions[0]) > first_real:
            raise ValueError("padding queries only make sense when the window starts at every row's first token")

    def prepend(x: torch.Tensor, fill: float | bool) -> torch.Tensor:
        block = torch.full((b, h_kv, pad, *x.shape[3:]), fill, dtype=x.dtype)
        return torch.cat((block, x), dim=2)

    positions = torch.where(inputs.positions >= 0, inputs.positions + pad, -1)
    queries = inputs.queries
    query_positions = inputs.query_positions + pad
    if pad_queries:
        garbage = torch.full((b, queries.shape[1], pad_queries, d), GARBAGE)
        queries = torch.cat((garbage, queries), dim=2)
        earlier = torch.arange(query_positions[0] - pad_queries, query_positions[0])
        query_positions = torch.cat((earlier, query_positions))
    padded = ScoreInputs(
        keys=prepend(inputs.keys, GARBAGE),
        values=prepend(inputs.values, GARBAGE),
        positions=prepend(positions, -1),
        valid=prepend(inputs.valid, False),
        has_history=prepend(inputs.has_history, False),
        queries=queries,
        query_positions=query_positions,
        rope_offset=inputs.rope_offset + pad,
        scaling=inputs.scaling,
        layer_idx=inputs.layer_idx,
        last_event_position=inputs.last_event_position + pad,
        rope_theta=inputs.rope_theta,
    )
    return padded, {k: prepend(v, GARBAGE) for k, v in state.items()}


def ref_attention(inputs: ScoreInputs) -> list:
    """Loop reference: ``att[bi][hq][t][j]`` softmax attention of window query t of query head hq over the
    valid candidates at or before its column (all zeros when it sees none)."""
    b, hq, w, _ = inputs.queries.shape
    n = inputs.keys.shape[2]
    g = hq // inputs.keys.shape[1]
    keys, queries = inputs.keys.double().tolist(), inputs.queries.double().tolist()
    pos, valid = inputs.positions.tolist(), inputs.valid.tolist()
    out = []
    for bi in range(b):
        per_head = []
        for h in range(hq):
            kv = h // g
            per_query = []
            for t in range(w):
                qp = int(inputs.query_positions[t])
                logits = {}
                for j in range(n):
                    if valid[bi][kv][j] and pos[bi][kv][j] <= qp:
                        logits[j] = inputs.scaling * sum(a * c for a, c in zip(queries[bi][h][t], keys[bi][kv][j]))
                row = [0.0] * n
                if logits:
                    top = max(logits.values())
                    total = sum(math.exp(v - top) for v in logits.values())
                    for j, v in logits.items():
                        row[j] = math.exp(v - top) / total
                per_query.append(row)
            per_head.append(per_query)
        out.append(per_head)
    return out
