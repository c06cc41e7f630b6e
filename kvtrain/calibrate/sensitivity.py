"""TaDA per-layer sensitivity: the output KL when one layer alone has its K and V fake-quantised.

For layer l and bits b, ``KL[l][b] = mean over tokens of KL(p_full || p_{l,b})`` (nats), where ``p`` are the
next-token distributions of a plain forward over the calibration blocks and ``p_{l,b}`` those of the same
forward with layer l's post-RoPE keys and values replaced by their TaDA round trip at b bits
(`kvtrain.quant.fake_quantize`). That is ``L * len(bits)`` forwards per block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from kvtrain.artifacts.quant_plan import CANDIDATE_BITS
from kvtrain.quant import fake_quantize
from kvtrain.runtime.routing import observe_attention


def _log_probs(model, blocks: Tensor) -> list[Tensor]:
    return [F.log_softmax(model(input_ids=b[None]).logits[0].double(), dim=-1) for b in blocks]


@torch.no_grad()
def tada_sensitivity(
    model,
    blocks: Tensor,
    group_size: int,
    *,
    done: Sequence[dict[int, float]] = (),
    on_layer: Callable[[list[dict[int, float]]], None] | None = None,
    progress: bool = True,
) -> list[dict[int, float]]:
    """``sensitivity[l][b]`` for every layer and b in {2, 4, 8}; ``blocks`` is ``[n, S]`` token ids.

    ``done`` holds the rows of layers already measured (resume); ``on_layer(rows)`` is called after each
    newly measured layer (checkpointing).
    """
    num_layers = model.config.num_hidden_layers
    rows = [dict(r) for r in done]
    if len(rows) > num_layers:
        raise ValueError(f"{len(rows)} sensitivity rows for {num_layers} layers")
    reference = _log_probs(model, blocks)
    todo = [(layer, bits) for layer in range(len(rows), num_layers) for bits in CANDIDATE_BITS]
    bar = tqdm(total=len(todo) * len(blocks), desc="tada sensitivity", disable=not progress)
    for layer in range(len(rows), num_layers):
        row: dict[int, float] = {}
        for bits in CANDIDATE_BITS:

            def quantise_one_layer(module, query, key, value, mask, layer=layer, bits=bits):
                if module.layer_idx != layer:
                    return None
                return fake_quantize(key, bits, group_size), fake_quantize(value, bits, group_size)

            total, count = 0.0, 0
            with observe_attention(model, quantise_one_layer):
                for block, ref in zip(blocks, reference):
                    logq = F.log_softmax(model(input_ids=block[None]).logits[0].double(), dim=-1)
                    total += float((ref.exp() * (ref - logq)).sum())
                    count += ref.shape[0]
                    bar.update(1)
            row[bits] = total / count
        rows.append(row)
        if on_layer is not None:
            on_layer(rows)
    bar.close()
    return rows
