"""The registered ``kvtrain`` attention function: one entry point for inference, replay and plain runs.

transformers calls it after RoPE and after `past_key_values.update`. It routes to
* the compressed cache layer that was just updated (decoding with `CompressedCache`),
* the active replay (a teacher-forced forward that reproduces the cache's keep-sets, for training),
* otherwise plain SDPA (e.g. the full-cache teacher).
Observers (`observe_attention`) see every call's post-RoPE queries, keys and values first: that is how
calibration collects statistics without hooks on modules.
It must also be registered as a mask function, otherwise transformers hands it ``attention_mask=None``.

Kernels: on CUDA tensors, cache decode steps run `kvtrain.kernels.decode_attention` and replay runs
`kvtrain.kernels.keyset_attention`; elsewhere both run the PyTorch code here and in `kvtrain.replay`.
The environment variable ``KVTRAIN_KERNELS`` (read at every call) overrides that: ``auto`` (default) as
above, ``triton`` always the kernels (on CPU only under ``TRITON_INTERPRET=1``, which is how the tests run
them), ``torch`` never. Both paths follow one convention: a padding key is seen by no query, and a query that
sees no key at all (e.g. a left-padding token before any real one) gets a zero output.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
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
    from kvtrain.replay import bound_replay

    for observer in _OBSERVERS.get():
        replaced = observer(module, query, key, value, attention_mask)
        if replaced is not None:
            key, value = replaced
    scaling = module.scaling if scaling is None else scaling
    layer = layer_awaiting_attention(module.layer_idx)
    # transformers passes the forward's RoPE positions along; SALS layers un-rotate queries and keys with them.
    position_ids = kwargs.get("position_ids")
    if layer is not None:
        return layer.attend(query, attention_mask, scaling, position_ids).transpose(1, 2), None
    replay = bound_replay(module)
    if replay is not None:
        out = replay.attend(module.layer_idx, query, key, value, attention_mask, scaling, position_ids)
        return out.transpose(1, 2), None
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


KERNELS_ENV = "KVTRAIN_KERNELS"
KERNEL_CHOICES = ("auto", "triton", "torch")


def use_kernels(device: torch.device) -> bool:
    """Whether attention on `device` runs the Triton kernels: CUDA by default, or as ``KVTRAIN_KERNELS`` says."""
    choice = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNELS_ENV}={os.environ[KERNELS_ENV]!r} must be one of {', '.join(KERNEL_CHOICES)}")
    if choice == "auto":
        return device.type == "cuda"
    return choice == "triton"


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
    from kvtrain.kernels import decode_attention

    b, h_kv = new_key.shape[:2]
    new_bias = torch.zeros(b, h_kv, 1, device=query.device).masked_fill(~new_valid[:, None, :], float("-inf"))
    out = decode_attention(
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
