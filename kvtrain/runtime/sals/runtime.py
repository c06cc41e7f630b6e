"""What the SALS cache layer (`kvtrain.runtime.sals.layer`) and SALS replay (`kvtrain.runtime.sals.replay`) share: the
calibrated bases, the model's RoPE, latent keys, selection scores and the token selection itself.

Both paths call the same functions on the same tensors in the same dtypes (latent keys in the model's
dtype, scores in float64), which is what makes replayed logits equal decoded ones.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from kvtrain.artifacts.sals_basis import SalsBasis, read_sals_basis
from kvtrain.config import KVCompressionConfig, SalsConfig
from kvtrain.lowrank.sals import compress_keys, latent_queries, latent_scores, select_tokens
from kvtrain.models.rope import RopeFn, unrotate


@dataclass
class SalsRuntime:
    """The resolved `SalsConfig` of one model: a basis per layer (rank-truncated) and the model's RoPE."""

    config: SalsConfig
    bases: list[SalsBasis]
    rope: RopeFn

    @classmethod
    def build(cls, config: KVCompressionConfig, model_config, rope: RopeFn) -> "SalsRuntime":
        """`rope`: the model's own rotary embedding (`kvtrain.models.rope.model_rope`)."""
        return cls(config.sals, read_sals_basis(config.sals.basis, model_config, config.sals.rank), rope)

    def basis(self, layer_idx: int, like: Tensor) -> SalsBasis:
        """The layer's basis on the device and in the dtype of ``like``."""
        basis = self.bases[layer_idx]
        return replace(basis, basis=basis.basis.to(device=like.device, dtype=like.dtype))

    def latent_keys(self, basis: SalsBasis, keys: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Latents ``[b, n, r]`` of post-RoPE ``keys`` ``[b, h_kv, n, d]`` rotated by cos/sin ``[b, n, d]``."""
        return compress_keys(unrotate(keys, cos, sin), basis)

    def latent_scores(self, basis: SalsBasis, queries: Tensor, cos: Tensor, sin: Tensor, latents: Tensor) -> Tensor:
        """SALS scores ``[b, m, n]`` (float64) of post-RoPE ``queries`` ``[b, h_q, m, d]`` against ``latents``."""
        latent_q = latent_queries(unrotate(queries, cos, sin), basis)
        return latent_scores(latent_q.double(), latents.double(), self.config.resolved_selection_rank)

    def top_k(self, stored: Tensor) -> Tensor:
        """Critical tokens per row for ``stored`` [B] valid stored tokens: `top_k`, or `token_fraction` of them."""
        if self.config.top_k is not None:
            return torch.full_like(stored, self.config.top_k)
        return torch.ceil(self.config.token_fraction * stored.double()).long()

    def select(self, scores: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """`select_tokens` over ``scores`` ``[B, n]`` with sinks, recent and the per-row top-k count."""
        return select_tokens(scores, self.top_k(valid.sum(-1)), self.config.sinks, self.config.recent, valid)


def head_summed_scores(queries: Tensor, keys: Tensor) -> Tensor:
    """Oracle scores ``[b, m, n]`` (float64): post-RoPE ``q . k`` summed over the query heads (GQA: query head j
    reads KV head j // g)."""
    group = queries.shape[1] // keys.shape[1]
    return (queries.double() @ keys.double().repeat_interleave(group, dim=1).mT).sum(dim=1)


def recency_scores(b: int, m: int, n: int, device: torch.device) -> Tensor:
    """Scores ``[b, m, n]`` equal to the column index: the most recent tokens win."""
    return torch.arange(n, dtype=torch.float64, device=device).expand(b, m, n)
