"""Driving a model through a `CompressedCache` exactly as decoding would, with given tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.schedule import prefill_chunks


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """RoPE positions of a (left-)padded batch, as `generate` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def teacher_forced_decode(
    model, cache: CompressedCache, input_ids: Tensor, attention_mask: Tensor | None = None, *, prefill_len: int
) -> Tensor:
    """Logits [b, S, V] of prefilling `prefill_len` tokens, then feeding the rest one token at a time.

    Each decode step is a separate forward through the cache, so compression happens exactly when it
    would during generation; this is the step-by-step reference that replay must match.
    """
    seq_len = input_ids.shape[1]
    if not 0 < prefill_len <= seq_len:
        raise ValueError(f"prefill_len={prefill_len} must be in [1, {seq_len}]")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    positions = position_ids_from_mask(mask)
    chunk = cache.compression_config.schedule.prefill_chunk
    spans = prefill_chunks(prefill_len, chunk) + [(t, t + 1) for t in range(prefill_len, seq_len)]
    logits = []
    for start, end in spans:
        out = model(
            input_ids=input_ids[:, start:end],
            attention_mask=mask[:, :end],
            position_ids=positions[:, start:end],
            past_key_values=cache,
            use_cache=True,
        )
        logits.append(out.logits)
    return torch.cat(logits, dim=1)
