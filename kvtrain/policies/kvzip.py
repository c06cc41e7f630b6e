"""KVzip: query-agnostic importance from context reconstruction.

A key's score is the largest attention it receives, over the query heads of its GQA group and over every query
of a *reconstruction pass*: after the context, the model reads a repeat prompt and then the context again,
teacher-forced. Keys the model needs to reproduce the context are the ones any later question can need.

The pass needs whole-model forwards, which a scorer may not run (`kvtrain.policies.base`: a scorer only reads
`ScoreInputs`). So the work is split in two:

* `reconstruction_scores(model, input_ids, ...)` runs the pass once per row, before the prefill, and returns a
  score table ``[b, layers, h_kv, columns]`` aligned with the (left-padded) columns of ``input_ids``. The
  reconstruction is fed in chunks of ``chunk_size`` queries over a growing plain cache, so its attention
  matrices are ``chunk_size x (2n + r)`` per head instead of the full square.
* `KVzipScorer` (``scorer: {name: kvzip}``) looks the table up at each candidate's column; the table is handed
  to it by ``with kvzip_table(table):`` around the cache's prefill *and* around a replay of the same tokens,
  so both select from identical scores and keep identical sets (the scorer state is the table, not the
  queries of the forward that runs the event).

Columns past the table's end (tokens written after the scored context) score +inf: they are kept like a
recent window. KVzip is meant for prefill compression; events after the context evict only context tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from kvtrain.policies.base import ScoreInputs, Scorer, register_scorer

# The prompt between the context and its copy (the paper's "repeat the previous context" instruction).
REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n\n"

_TABLE: ContextVar[Tensor | None] = ContextVar("kvzip_table", default=None)


@contextlib.contextmanager
def kvzip_table(table: Tensor) -> Iterator[None]:
    """Make `table` ``[b, layers, h_kv, columns]`` (from `reconstruction_scores`) the scores of every
    `KVzipScorer` event run inside the block."""
    if table.dim() != 4:
        raise ValueError(f"kvzip score table must be [batch, layers, kv_heads, columns], not {tuple(table.shape)}")
    if torch.isnan(table).any():
        raise ValueError("kvzip score table holds NaN")
    token = _TABLE.set(table)
    try:
        yield
    finally:
        _TABLE.reset(token)


@torch.no_grad()
def reconstruction_scores(
    model, input_ids: Tensor, attention_mask: Tensor | None, repeat_ids: Tensor, chunk_size: int = 256
) -> Tensor:
    """Max attention each context key receives while the model reconstructs the context: ``[b, L, h_kv, s]``
    float32 for ``input_ids`` ``[b, s]`` (left padding allowed; padding columns score 0).

    Each row's real tokens are the context; the pass is context, ``repeat_ids`` ``[r]``, context again, with the
    model's eager attention (its probabilities are what is scored) and a plain cache, fed ``chunk_size`` queries
    at a time after the context's prefill.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    config = model.config
    h_kv = config.num_key_value_heads
    group = config.num_attention_heads // h_kv
    b, s = input_ids.shape
    table = torch.zeros(b, config.num_hidden_layers, h_kv, s, dtype=torch.float32, device=input_ids.device)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for row in range(b):
            columns = mask[row].nonzero().squeeze(1)
            context = input_ids[row, columns]
            table[row, :, :, columns] = _row_scores(model, context, repeat_ids.to(context.device), chunk_size, group)
    finally:
        model.set_attn_implementation(previous)
    return table


def _row_scores(model, context: Tensor, repeat_ids: Tensor, chunk_size: int, group: int) -> Tensor:
    """``[L, h_kv, n]`` for one row's context ``[n]``."""
    n = context.shape[0]
    cache = DynamicCache()
    model(input_ids=context[None], past_key_values=cache, use_cache=True)
    reconstruction = torch.cat([repeat_ids, context])
    best: Tensor | None = None
    for start in range(0, reconstruction.shape[0], chunk_size):
        piece = reconstruction[start : start + chunk_size]
        positions = torch.arange(n + start, n + start + piece.shape[0], device=context.device)[None]
        out = model(input_ids=piece[None], past_key_values=cache, position_ids=positions, use_cache=True,
                    output_attentions=True)
        # attentions: per layer [1, h_q, chunk, keys so far]; the context keys are the first n.
        chunk_best = torch.stack([
            a[0, :, :, :n].float().unflatten(0, (-1, group)).amax(dim=(1, 2)) for a in out.attentions
        ])
        best = chunk_best if best is None else torch.maximum(best, chunk_best)
    return best


@register_scorer
@dataclass
class KVzipScorer(Scorer):
    """The reconstruction score of each candidate's column, from the table of the enclosing `kvzip_table`."""

    name = "kvzip"

    def __call__(self, inputs: ScoreInputs, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        table = _TABLE.get()
        if table is None:
            raise ValueError(
                "scorer 'kvzip' needs the context's reconstruction scores: run the prefill (and its replay) inside "
                "`with kvzip_table(reconstruction_scores(model, input_ids, attention_mask, repeat_ids)):`"
            )
        b, h_kv, _ = inputs.keys.shape[:3]
        if table.shape[0] != b or table.shape[2] != h_kv or inputs.layer_idx >= table.shape[1]:
            raise ValueError(
                f"kvzip score table of shape {tuple(table.shape)} does not fit batch {b}, layer {inputs.layer_idx}, "
                f"{h_kv} KV heads: it was computed for other inputs"
            )
        layer = table[:, inputs.layer_idx].to(inputs.keys.device)  # [b, h_kv, columns]
        columns = layer.shape[-1]
        scored = inputs.valid & (inputs.positions < columns)
        looked_up = torch.gather(layer, 2, inputs.positions.clamp(0, columns - 1))
        scores = torch.where(scored, looked_up, float("inf"))
        return scores.masked_fill(~inputs.valid, 0.0), {}
