"""Answering evaluation items under a compressed cache (or the full cache), as a user of the cache would.

For each item, the first `prefill_pieces` pieces are prefilled in one forward (the cache compresses them
after it, per its schedule), the remaining pieces are fed one token at a time (decode steps: a user turn
arriving after a compressed system prompt or document), then the response is decoded greedily, each step
through the cache, so compression during decoding happens on the schedule. Items whose token layout is
identical (same prefill and follow-up lengths) share a batch: no padding, so every row is compressed exactly
as it would be alone.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kvtrain.eval.cache_bytes import CacheBytes, cache_bytes
from kvtrain.eval.items import EvalItem, cut_at_stop
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.routing import use_kvtrain_attention


@dataclass
class ItemRun:
    """The response to one item, the cache's bytes after it, and (when recorded) the kept positions of the
    first compression event, per layer: [h_kv, k] (-1 = empty slot), None for a dense layer."""

    response: str
    bytes: CacheBytes
    kept_after_prefill: list[Tensor | None] | None = None


def tokenize_pieces(tokenizer, item: EvalItem) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the item's prompt and the [start, end) token span of each piece (pieces are tokenised one by
    one, so span boundaries are exact). A tokenizer that adds a BOS token by default gets one in front."""
    ids: list[int] = []
    probe = tokenizer("a")["input_ids"]
    if tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id:
        ids.append(tokenizer.bos_token_id)
    spans = []
    for _, text in item.pieces:
        start = len(ids)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        spans.append((start, len(ids)))
    return ids, spans


def forward_step(model, cache, ids: Tensor, seen: int, *, last_logits_only: bool = False):
    """`last_logits_only`: the LM head for the last position only (a prefill needs no more; at 1K tokens of a
    small model the head over every position is about a fifth of the work)."""
    b, q = ids.shape
    positions = torch.arange(seen, seen + q, device=ids.device).expand(b, q)
    mask = torch.ones(b, seen + q, dtype=torch.long, device=ids.device)
    extra = {"logits_to_keep": 1} if last_logits_only else {}
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                 **extra)


def new_cache(model, config, record: bool):
    from transformers import DynamicCache


    if config is None:
        return DynamicCache(config=model.config)
    return CompressedCache.for_model(model, config, record=record)


@torch.no_grad()
def run_items(model, tokenizer, items: list[EvalItem], config, *, batch_size: int = 8, record: bool = False,
              progress: bool = False, desc: str = "items") -> list[ItemRun]:
    """Answer every item under `config` (a `KVCompressionConfig`, or None for the full `DynamicCache`)."""
    if config is None:

        use_kvtrain_attention(model)  # the same attention code as the compressed runs (plain SDPA without a cache)
    layout: dict[tuple[int, int], list[int]] = defaultdict(list)
    encoded = []
    for i, item in enumerate(items):
        ids, spans = tokenize_pieces(tokenizer, item)
        split = spans[item.prefill_pieces - 1][1]
        encoded.append((ids, split))
        layout[(split, len(ids))].append(i)
    eos = _eos_ids(model, tokenizer)
    runs: list[ItemRun | None] = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, disable=not progress, leave=False)
    for (split, _), members in layout.items():
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            ids = torch.tensor([encoded[i][0] for i in batch], device=model.device)
            new_tokens = max(items[i].max_new_tokens for i in batch)
            stops = [items[i].stop for i in batch]
            cache = new_cache(model, config, record)
            out = forward_step(model, cache, ids[:, :split], 0, last_logits_only=True)
            seen = split
            kept = _first_event(cache) if record and config is not None else None
            for t in range(split, ids.shape[1]):
                out = forward_step(model, cache, ids[:, t : t + 1], seen)
                seen += 1
            generated = _greedy(model, cache, out.logits[:, -1], seen, new_tokens, tokenizer, stops, eos)
            measured = cache_bytes(cache, model.config)
            for row, i in enumerate(batch):
                text = tokenizer.decode(generated[row][: items[i].max_new_tokens], skip_special_tokens=True)
                runs[i] = ItemRun(cut_at_stop(text, items[i].stop), measured,
                                  None if kept is None else [k if k is None else k[row] for k in kept])
            bar.update(len(batch))
    bar.close()
    return runs


def _eos_ids(model, tokenizer) -> set[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return {t for t in [tokenizer.eos_token_id, *ids] if isinstance(t, int)}


def _first_event(cache) -> list[Tensor | None]:
    """Per layer, the positions kept by the first compression event ([b, h_kv, k]), None if none happened."""
    return [records[0].kept.cpu() if records else None for records in cache.records]


def _greedy(model, cache, logits: Tensor, seen: int, max_new: int, tokenizer, stops: list[list[str]],
            eos: set[int]) -> list[list[int]]:
    """Greedy tokens per row until every row has produced an EOS token or one of its stop strings."""
    rows = logits.shape[0]
    generated: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for step in range(max_new):
        token = logits.argmax(-1)
        for row in range(rows):
            if done[row]:
                continue
            tok = int(token[row])
            if tok in eos:
                done[row] = True
                continue
            generated[row].append(tok)
            if stops[row] and any(s in tokenizer.decode(generated[row]) for s in stops[row]):
                done[row] = True
        if all(done) or step == max_new - 1:
            break
        logits = forward_step(model, cache, token[:, None], seen).logits[:, -1]
        seen += 1
    return generated
