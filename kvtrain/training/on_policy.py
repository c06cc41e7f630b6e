"""GKD-style on-policy batches: the student continues the prompts itself, decoding under the compressed cache."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

from kvtrain.config import KVCompressionConfig
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.compressor import LayerPairs


def step_generator(seed: int, step: int, salt: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, salt), so a resumed run draws the same values."""
    return torch.Generator().manual_seed(hash((seed, step, salt)) & 0x7FFF_FFFF_FFFF_FFFF)


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device):
    """Run a block with the global RNG (CPU and the device's) seeded, restoring it afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate_continuations(
    model,
    base_model,
    kv_config: KVCompressionConfig,
    prompts: Tensor,
    total_len: int,
    *,
    temperature: float,
    seed: int,
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    projections: LayerPairs | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample `total_len - P` tokens after `prompts` [b, P] under a `CompressedCache`.

    `model` is what `generate` is called on (a PeftModel or the causal LM), `base_model` the causal LM
    the cache hooks into. A row stops at the first of any of `eos_token_ids` (Llama-3.1-Instruct has three;
    empty: no EOS, every row runs to `total_len`). Returns (input_ids, attention_mask), both [b, total_len];
    tokens after a row's first EOS are padding (mask 0). The model runs in eval mode (no LoRA dropout) while
    generating. `projections`: the low-rank pairs being trained, in place of the config's file.
    """
    cache = CompressedCache.for_model(base_model, kv_config, projections=projections)
    was_training = model.training
    model.eval()
    try:
        with seeded_rng(seed, prompts.device):
            out = model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                past_key_values=cache,
                max_new_tokens=total_len - prompts.shape[1],
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                pad_token_id=pad_token_id,
                eos_token_id=list(eos_token_ids) or None,
            )
    finally:
        model.train(was_training)
    ids = torch.full((prompts.shape[0], total_len), pad_token_id, dtype=prompts.dtype, device=prompts.device)
    ids[:, : out.shape[1]] = out
    mask = torch.ones_like(ids)
    mask[:, prompts.shape[1] :] = mask_after_eos(ids[:, prompts.shape[1] :], eos_token_ids)
    mask[:, out.shape[1] :] = 0
    ids = ids.masked_fill(mask == 0, pad_token_id)
    return ids, mask


def mask_after_eos(continuation: Tensor, eos_token_ids: Sequence[int]) -> Tensor:
    """``[b, n]`` long: 1 up to and including a row's first token from `eos_token_ids`, 0 after it."""
    is_eos = torch.isin(continuation, torch.tensor(list(eos_token_ids), dtype=continuation.dtype,
                                                   device=continuation.device)).long()
    # A token is padding once an EOS occurred strictly before it.
    return ((is_eos.cumsum(dim=1) - is_eos) == 0).long()
