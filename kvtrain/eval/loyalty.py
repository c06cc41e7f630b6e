"""Loyalty: does the model under a compressed cache predict what the full-cache model predicts?

For each sample, a context is prefilled through a `CompressedCache` (compressed at prefill and on the
decode schedule) and the text's real continuation is teacher-forced one token at a time, exactly as it
would be decoded. Against the full-cache model on the same tokens we report, per continuation token:
KL(full || compressed) of the next-token distributions, top-1 agreement, the NLL of the real token under
both, and the bytes the cache holds per token seen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from kvtrain.config import KVCompressionConfig
from kvtrain.errors import NonFiniteError
from kvtrain.models import head_dim
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.compressor import LayerPairs
from kvtrain.runtime.decode import teacher_forced_decode
from kvtrain.runtime.replay import replay_compression
from kvtrain.runtime.routing import use_kvtrain_attention


@dataclass
class LoyaltyResult:
    kl_full_to_compressed: float  # mean over continuation tokens of KL(p_full || p_compressed), nats
    top1_agreement: float
    nll_compressed: float
    nll_full: float
    cache_bytes_per_token: float | None  # None when measured by replay
    full_cache_bytes_per_token: float
    samples: int
    context_len: int
    continuation_len: int

    @property
    def cache_fraction(self) -> float | None:
        if self.cache_bytes_per_token is None:
            return None
        return self.cache_bytes_per_token / self.full_cache_bytes_per_token

    def to_dict(self) -> dict:
        return {**asdict(self), "cache_fraction": self.cache_fraction}


def continuation_metrics(full_logits: Tensor, comp_logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Per-token metrics; logits [n, V] predict `targets` [n]. Non-finite logits are an error, never a metric."""
    for name, logits in (("full-cache (reference)", full_logits), ("compressed", comp_logits)):
        if not torch.isfinite(logits).all():
            bad = int((~torch.isfinite(logits)).any(dim=-1).nonzero()[0])
            raise NonFiniteError(f"the {name} logits are not finite (first at continuation token {bad}): "
                                 "no loyalty metric can be computed from them")
    log_full = F.log_softmax(full_logits.float(), dim=-1)
    log_comp = F.log_softmax(comp_logits.float(), dim=-1)
    return {
        "kl": (log_full.exp() * (log_full - log_comp)).sum(-1),
        "top1": (full_logits.argmax(-1) == comp_logits.argmax(-1)).float(),
        "nll_compressed": -log_comp.gather(-1, targets[:, None])[:, 0],
        "nll_full": -log_full.gather(-1, targets[:, None])[:, 0],
    }


def full_cache_bytes_per_token(model) -> int:
    config = model.config
    element = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * element


@torch.no_grad()
def evaluate_loyalty(
    model,
    configs: Sequence[KVCompressionConfig],
    blocks: Tensor,
    *,
    context_len: int,
    reference: Callable[[Tensor], Tensor] | None = None,
    method: str = "cache",
    progress: bool = True,
    projections: LayerPairs | None = None,
) -> list[LoyaltyResult]:
    """One result per config; `blocks` [n, context_len + continuation_len] token ids, one sample per row.

    `reference(ids) -> logits` gives the distributions to be loyal to (default: `model` with a full cache;
    after distillation, the original model). `method="cache"` decodes the continuation step by step through a
    `CompressedCache`, as users run it; `method="replay"` computes the same logits in one forward
    (`replay_compression`, equal to decoding by the parity tests) and reports no cache bytes. The reference
    logits of each sample are computed once and shared by every config. `projections` replaces the low-rank
    pairs of the configs' projections file (training passes the pairs it learns).
    """
    if method not in ("cache", "replay"):
        raise ValueError(f"method={method!r}: expected 'cache' or 'replay'")
    reference = reference or (lambda ids: model(input_ids=ids).logits)
    if blocks.shape[1] <= context_len:
        raise ValueError(f"blocks have {blocks.shape[1]} tokens: no continuation after a {context_len}-token context")
    use_kvtrain_attention(model)
    per_token: list[dict[str, list[Tensor]]] = [{} for _ in configs]
    cache_bytes: list[list[float]] = [[] for _ in configs]
    bar = tqdm(total=len(blocks) * len(configs), desc="loyalty", disable=not progress, leave=False)
    for row in blocks:
        ids = row[None].to(model.device)
        full = reference(ids)[0, context_len - 1 : -1]
        for i, config in enumerate(configs):
            if method == "cache":
                cache = CompressedCache.for_model(model, config, projections=projections)
                comp = teacher_forced_decode(model, cache, ids, prefill_len=context_len)
                cache_bytes[i].append(cache.nbytes() / cache.get_seq_length())
            else:
                with replay_compression(model, config, prefill_len=context_len, projections=projections):
                    comp = model(input_ids=ids, use_cache=False).logits
            comp = comp[0, context_len - 1 : -1]
            for name, values in continuation_metrics(full, comp, ids[0, context_len:]).items():
                per_token[i].setdefault(name, []).append(values.cpu())
            bar.update()
    bar.close()
    results = []
    for metrics, sizes in zip(per_token, cache_bytes):
        means = {name: torch.cat(values).mean().item() for name, values in metrics.items()}
        results.append(
            LoyaltyResult(
                kl_full_to_compressed=means["kl"],
                top1_agreement=means["top1"],
                nll_compressed=means["nll_compressed"],
                nll_full=means["nll_full"],
                cache_bytes_per_token=sum(sizes) / len(sizes) if sizes else None,
                full_cache_bytes_per_token=full_cache_bytes_per_token(model),
                samples=blocks.shape[0],
                context_len=context_len,
                continuation_len=blocks.shape[1] - context_len,
            )
        )
    return results
