"""SALS replay: the attention a `SalsLayer` cache gives every token, for a whole teacher-forced sequence at once.

Row t belongs to a forward the cache would have run: a prefill chunk ``[s, e)`` (rows < ``prefill_len``,
chunked by ``schedule.prefill_chunk``) or its own decode step (``s = t``). It attends
* the stored tokens ``j < s``, reconstructed from their latents and rotated at their positions: all of them
  in a prefill chunk, the selected ones (sinks + recent + top-k by the layer's score) in a decode step;
* its own forward's tokens ``s <= j <= t`` with their exact keys.
Values of tokens before the last event at or before ``s`` are the codec's round trip (what the cache holds
archived from that event on), the others exact: the same schedule as `kvtrain.runtime.schedule.event_points`.

Decode rows choose different token sets, so this builds an ``S x S`` visibility per batch row (shared by the
layer's heads) and attends densely, in PyTorch on every device (no keep-set kernel). Gradients flow through
the reconstructed keys into the latents, which are linear in the keys (the basis is a frozen buffer), and
through the exact keys and values; not through selection.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvtrain.lowrank.sals import reconstruct_keys
from kvtrain.runtime.attention import key_validity
from kvtrain.runtime.compressor import LayerCompressor
from kvtrain.runtime.sals.runtime import SalsRuntime, head_summed_scores, recency_scores
from kvtrain.runtime.schedule import archived_before, event_points, forward_starts


def sals_replay_attention(
    runtime: SalsRuntime,
    layer_idx: int,
    compressor: LayerCompressor,
    prefill_len: int,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    position_ids: Tensor | None,
) -> Tensor:
    """``[b, h_q, S, d_v]`` for query ``[b, h_q, S, d]`` and post-RoPE key, value ``[b, h_kv, S, d]``."""
    if position_ids is None:
        raise ValueError(f"layer {layer_idx}: SALS replay needs the forward's position_ids to undo RoPE")
    b, h_q, seq_len, _ = query.shape
    h_kv = key.shape[1]
    device = query.device
    valid = key_validity(attention_mask, seq_len, batch=b, device=device)
    cos, sin = runtime.rope(position_ids.expand(b, seq_len))
    basis = runtime.basis(layer_idx, key)
    latents = runtime.latent_keys(basis, key, cos, sin)
    rebuilt = reconstruct_keys(latents, basis, cos, sin)

    schedule = compressor.policy.schedule
    starts = forward_starts(seq_len, prefill_len, schedule.prefill_chunk, device)
    cols = torch.arange(seq_len, device=device)
    own = (cols[None] >= starts[:, None]) & (cols[None] <= cols[:, None])  # [S, S]
    stored = cols[None] < starts[:, None]
    exact_vis = own[None] & valid[:, None, :]
    stored_vis = stored[None] & valid[:, None, :]
    if seq_len > prefill_len:
        chosen = _decode_selection(runtime, basis, query, key, latents, cos, sin, valid, prefill_len)
        stored_vis = torch.cat([stored_vis[:, :prefill_len], chosen], dim=1)

    group = h_q // h_kv
    logits_exact = (query @ key.repeat_interleave(group, dim=1).mT) * scaling
    logits_rebuilt = (query @ rebuilt.repeat_interleave(group, dim=1).mT) * scaling
    visible = exact_vis | stored_vis
    # A row that sees nothing (a padding query) gets finite logits and a zero output, as in the cache.
    dead = ~visible.any(dim=-1, keepdim=True)[:, None]  # [b, 1, S, 1]
    bias = torch.zeros(visible.shape, dtype=query.dtype, device=device).masked_fill(~visible, float("-inf"))
    bias = bias[:, None].masked_fill(dead, 0.0)
    probs = torch.softmax(torch.where(exact_vis[:, None], logits_exact, logits_rebuilt) + bias, dim=-1)
    values = value.repeat_interleave(group, dim=1)
    codec = compressor.codecs.values
    if codec is None:
        out = probs @ values
    else:
        archived = cols[None] < archived_before(starts, event_points(schedule, prefill_len, seq_len))[:, None]
        rounded = codec.roundtrip(value).repeat_interleave(group, dim=1)
        out = (probs * archived) @ rounded + (probs * ~archived) @ values
    return out.masked_fill(dead, 0.0)


@torch.no_grad()
def _decode_selection(
    runtime: SalsRuntime, basis, query: Tensor, key: Tensor, latents: Tensor, cos: Tensor, sin: Tensor,
    valid: Tensor, prefill_len: int,
) -> Tensor:
    """``[b, S - P, S]`` bool: the stored tokens each decode row (t >= P) attends besides itself."""
    b, _, seq_len, _ = query.shape
    rows = seq_len - prefill_len
    decode_q = query[:, :, prefill_len:]
    selector = runtime.config.selector
    if selector == "latent":
        scores = runtime.latent_scores(basis, decode_q, cos[:, prefill_len:], sin[:, prefill_len:], latents)
    elif selector == "exact":
        scores = head_summed_scores(decode_q, key)
    else:
        scores = recency_scores(b, rows, seq_len, query.device)
    cols = torch.arange(seq_len, device=query.device)
    before = cols[None] < cols[prefill_len:, None]  # [rows, S]: the tokens stored at step t
    row_valid = (valid[:, None, :] & before[None]).reshape(b * rows, seq_len)
    index, keep = runtime.select(scores.reshape(b * rows, seq_len), row_valid)
    chosen = torch.zeros(b * rows, seq_len, dtype=torch.bool, device=query.device).scatter(1, index, keep)
    return chosen.reshape(b, rows, seq_len)
