"""The registered ``kvtrain`` attention function: one entry point for inference, replay and plain runs.

transformers calls it after RoPE and after `past_key_values.update`. It routes to
* the compressed cache layer that was just updated (decoding with `CompressedCache`),
* the active replay (a teacher-forced forward that reproduces the cache's keep-sets, for training),
* otherwise plain SDPA (e.g. the full-cache teacher).
Observers (`observe_attention`) see every call's post-RoPE queries, keys and values first: that is how
calibration collects statistics without hooks on modules.
It must also be registered as a mask function, otherwise transformers hands it ``attention_mask=None``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "kvtrain"

# callback(module, query [b,h_q,q,d], key [b,h_kv,kv,d], value, attention_mask) for every attention call;
# it returns None, or a (key, value) pair that replaces the inputs (e.g. to measure a perturbation).
Observer = Callable[..., "tuple[Tensor, Tensor] | None"]
_OBSERVERS: contextvars.ContextVar[tuple[Observer, ...]] = contextvars.ContextVar("kvtrain_observers", default=())


@contextlib.contextmanager
def observe_attention(model, observer: Observer) -> Iterator[None]:
    """Within this block, `observer` sees (and may replace) the inputs of every attention call (post-RoPE)."""
    use_kvtrain_attention(model)
    token = _OBSERVERS.set(_OBSERVERS.get() + (observer,))
    try:
        yield
    finally:
        _OBSERVERS.reset(token)


def kvtrain_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from kvtrain.cache import layer_awaiting_attention
    from kvtrain.replay import active_replay

    for observer in _OBSERVERS.get():
        replaced = observer(module, query, key, value, attention_mask)
        if replaced is not None:
            key, value = replaced
    scaling = module.scaling if scaling is None else scaling
    layer = layer_awaiting_attention(module.layer_idx)
    if layer is not None:
        return layer.attend(query, attention_mask, scaling).transpose(1, 2), None
    replay = active_replay()
    if replay is not None:
        return replay.attend(module.layer_idx, query, key, value, attention_mask, scaling).transpose(1, 2), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register() -> None:
    AttentionInterface.register(ATTENTION_NAME, kvtrain_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_kvtrain_attention(model) -> None:
    """Route the model's attention through kvtrain (idempotent)."""
    register()
    if getattr(model.config, "_attn_implementation", None) != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)


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
    -inf for empty slots); new_* [b, h_kv, q, d] with new_valid [b, q]. Returns [b, h_q, q, d_v].
    """
    b, h_q, q, _ = query.shape
    h_kv = new_keys.shape[1]
    causal = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()
    local = causal[None] & new_valid[:, None, :]
    # A padding query may see no real key at all; letting it see itself keeps its (unused) output finite,
    # so that NaNs never reach the cache through later layers.
    local = local | torch.eye(q, dtype=torch.bool, device=query.device)[None]
    local_bias = torch.zeros(local.shape, dtype=torch.float32, device=query.device).masked_fill(~local, float("-inf"))
    bias = torch.cat(
        [stored_bias[:, :, None, :].expand(b, h_kv, q, stored_bias.shape[-1]), local_bias[:, None].expand(b, h_kv, q, q)],
        dim=-1,
    )
    keys = torch.cat([stored_keys, new_keys], dim=2)
    values = torch.cat([stored_values, new_values], dim=2)
    return grouped_sdpa(query, keys, values, bias, scaling)


def grouped_sdpa(query: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scaling: float) -> Tensor:
    """SDPA with GQA and a per-KV-head additive bias [b, h_kv, q, n]."""
    group = query.shape[1] // keys.shape[1]
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        bias = bias.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=bias.to(query.dtype), scale=scaling)
