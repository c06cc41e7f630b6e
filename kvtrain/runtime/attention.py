"""Attention arithmetic shared by the cache layers and replay: which keys are real, and queries over a stored set
plus their own causal block.

Both paths follow one convention: a padding key is seen by no query, and a query that sees no key at all (e.g. a
left-padding token before any real one) gets a zero output. A decode step (one query, no gradient) runs the
split-K `decode_attention` kernel when the kernel switch says so (`kvtrain.kernels.dispatch`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kvtrain import kernels
from kvtrain.kernels.dispatch import use_kernels


def key_validity(attention_mask: Tensor | None, n_new: int, *, batch: int, device) -> Tensor:
    """Which of the last `n_new` key columns are real tokens, [b, n_new] bool.

    A column is real iff some query may attend it; that holds for left and right padding alike.
    """
    if attention_mask is None:
        return torch.ones(batch, n_new, dtype=torch.bool, device=device)
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return attention_mask[:, 0, :, -n_new:].any(dim=1)


def attend_with_stored(
    query: Tensor,
    stored_keys: Tensor,
    stored_values: Tensor,
    stored_bias: Tensor,
    new_keys: Tensor,
    new_values: Tensor,
    new_valid: Tensor,
    scaling: float,
) -> Tensor:
    """Queries (the last q tokens) over a stored set plus the q new keys, causal among the new ones.

    Shapes: query [b, h_q, q, d]; stored_* [b, h_kv, n, d] with stored_bias [b, h_kv, n] (0 / log votes /
    -inf for empty slots); new_* [b, h_kv, q, d] with new_valid [b, q] (padding keys are never attended).
    Returns [b, h_q, q, d_v]; a query that sees no key gets zeros. A single query (a decode step) runs
    `decode_attention` when `use_kernels` says so and no gradient is needed (that kernel has no backward).
    """
    q = query.shape[2]
    if q == 1 and use_kernels(query.device) and not _needs_grad(query, stored_keys, stored_values, new_keys, new_values):
        return _decode_step(query, stored_keys, stored_values, stored_bias, new_keys, new_values, new_valid, scaling)
    b = query.shape[0]
    h_kv = new_keys.shape[1]
    causal = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()
    local = causal[None] & new_valid[:, None, :]
    local_bias = torch.zeros(local.shape, dtype=torch.float32, device=query.device).masked_fill(~local, float("-inf"))
    bias = torch.cat(
        [stored_bias[:, :, None, :].expand(b, h_kv, q, stored_bias.shape[-1]), local_bias[:, None].expand(b, h_kv, q, q)],
        dim=-1,
    )
    keys = torch.cat([stored_keys, new_keys], dim=2)
    values = torch.cat([stored_values, new_values], dim=2)
    # A query that sees nothing would make softmax NaN, and NaN gradients survive a later masking; give such
    # rows a finite bias and zero their output instead (what the kernels return for them).
    dead = (bias == float("-inf")).all(dim=-1)  # [b, h_kv, q]
    out = grouped_sdpa(query, keys, values, bias.masked_fill(dead[..., None], 0.0), scaling)
    group = query.shape[1] // h_kv
    return out.masked_fill(dead.repeat_interleave(group, dim=1)[..., None], 0.0)


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _decode_step(
    query: Tensor,
    stored_keys: Tensor,
    stored_values: Tensor,
    stored_bias: Tensor,
    new_key: Tensor,
    new_value: Tensor,
    new_valid: Tensor,
    scaling: float,
) -> Tensor:
    """`attend_with_stored` for one new token through the split-K decode kernel: [b, h_q, 1, d_v]."""
    b, h_kv = new_key.shape[:2]
    new_bias = torch.zeros(b, h_kv, 1, device=query.device).masked_fill(~new_valid[:, None, :], float("-inf"))
    out = kernels.decode_attention(
        query[:, :, 0],
        torch.cat([stored_keys, new_key], dim=2),
        torch.cat([stored_values, new_value], dim=2),
        bias=torch.cat([stored_bias.float(), new_bias], dim=2),
        scaling=scaling,
        force="triton",
    )
    return out[:, :, None]


def grouped_sdpa(query: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scaling: float) -> Tensor:
    """SDPA with GQA and a per-KV-head additive bias [b, h_kv, q, n]."""
    group = query.shape[1] // keys.shape[1]
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        bias = bias.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=bias.to(query.dtype), scale=scaling)
